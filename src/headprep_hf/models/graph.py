"""Graph property prediction: a GCN over OGB molecule graphs whose task head is the final linear layer.

`GCN` follows the paper's graph setting (a 5-layer GCN pretrained on ogbg-molpcba, finetuned on ogbg-moltox21): OGB's
`AtomEncoder` / `BondEncoder` embed the integer atom and bond features written by `ogb.utils.smiles2graph`, five
message-passing layers (hidden 300, BatchNorm, ReLU between layers, dropout), mean pooling over each graph's atoms,
and `classifier` = Linear(hidden, num_tasks). The pooled graph embedding (the input of `classifier`) is the feature
`z` of the energy/drift measurements, so the generic split finds the head without configuration.

Batches are dicts of tensors (`GraphCollator` in `headprep_hf.data.graphs`): `x` (atoms x 9), `edge_index`
(2 x edges), `edge_attr` (edges x 3), `batch` (graph index of every atom), `ptr` (graph offsets) and `labels`; the
Trainer moves them to the device like any other batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import MessagePassing, global_mean_pool
from torch_geometric.utils import degree


def _encoders():
    # Imported lazily (ogb pulls in rdkit and pandas), without ogb's PyPI version check.
    from ..ogb_compat import import_ogb

    import_ogb()
    from ogb.graphproppred.mol_encoder import AtomEncoder, BondEncoder

    return AtomEncoder, BondEncoder


class GCNLayer(MessagePassing):
    """One graph convolution with bond features: symmetric degree normalisation (self-loop counted in the degree),
    message `relu(W h_j + bond(e_ij))`, plus the node's own `relu(W h_i + r) / deg_i` (r a learned root vector)."""

    def __init__(self, hidden_size: int):
        super().__init__(aggr="add")
        _, BondEncoder = _encoders()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.root = nn.Embedding(1, hidden_size)
        self.bond_encoder = BondEncoder(hidden_size)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        bonds = self.bond_encoder(edge_attr)
        row, col = edge_index
        deg = degree(row, x.shape[0], dtype=x.dtype) + 1.0
        inv_sqrt = deg.pow(-0.5)
        norm = inv_sqrt[row] * inv_sqrt[col]
        return (
            self.propagate(edge_index, x=x, edge_attr=bonds, norm=norm) + F.relu(x + self.root.weight) / deg[:, None]
        )

    def message(self, x_j: torch.Tensor, edge_attr: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        return norm[:, None] * F.relu(x_j + edge_attr)


class GCN(nn.Module):
    """GCN for multi-task graph property prediction; returns `{"logits": (graphs, num_tasks)}`.

    Args:
        num_tasks: Outputs of the head (binary tasks or regression targets).
        num_layers: Message-passing layers (paper: 5).
        hidden_size: Width of the atom embeddings (paper/OGB: 300).
        dropout: Dropout after every layer (OGB: 0.5); off in eval mode, so HP with a frozen backbone sees none.
        problem_type: `"multi_label_classification"` (masked BCE, ROC-AUC) or `"regression"` (masked MSE, RMSE);
            read by the trainer when `HeadPrepConfig.problem_type` is unset.
    """

    def __init__(
        self,
        num_tasks: int,
        num_layers: int = 5,
        hidden_size: int = 300,
        dropout: float = 0.5,
        problem_type: str = "multi_label_classification",
    ):
        super().__init__()
        if num_layers < 1 or hidden_size < 1 or num_tasks < 1:
            raise ValueError(f"num_layers, hidden_size and num_tasks must be >= 1, got {num_layers}, {hidden_size}, "
                             f"{num_tasks}")  # fmt: skip
        AtomEncoder, _ = _encoders()
        self.atom_encoder = AtomEncoder(hidden_size)
        self.convs = nn.ModuleList(GCNLayer(hidden_size) for _ in range(num_layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden_size) for _ in range(num_layers))
        self.dropout = dropout
        self.classifier = nn.Linear(hidden_size, num_tasks)
        self.problem_type = problem_type
        self.config_dict = dict(
            num_tasks=num_tasks, num_layers=num_layers, hidden_size=hidden_size, dropout=dropout,
            problem_type=problem_type,
        )  # fmt: skip

    def graph_embedding(self, x, edge_index, edge_attr, batch, ptr=None) -> torch.Tensor:
        """Mean-pooled atom embeddings after the last layer: the feature z of every graph."""
        h = self.atom_encoder(x)
        last = len(self.convs) - 1
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h, edge_index, edge_attr))
            if i < last:
                h = F.relu(h)
            h = F.dropout(h, p=self.dropout, training=self.training)
        size = None if ptr is None else ptr.shape[0] - 1
        return global_mean_pool(h, batch, size=size)

    def forward(self, x, edge_index, edge_attr, batch, ptr=None) -> dict[str, torch.Tensor]:
        return {"logits": self.classifier(self.graph_embedding(x, edge_index, edge_attr, batch, ptr))}
