"""PEFT (LoRA) models: with HP off the trainer is `Trainer` on them (weights, logs, resume from an adapter
checkpoint); with HP on, the head is the wrapped classifier (`base_model.model.classifier`, PEFT's `modules_to_save`
copy trains) and the measurements read it. Tiny models built from configs."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

from headprep_hf import HeadPrepConfig, HeadPrepTrainer

peft = pytest.importorskip("peft")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, lm=False):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(1, 50, (n, 8), generator=g)
        self.y = self.x.clone() if lm else self.x[:, 0] % 2

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}


def lora_bert(task_type="SEQ_CLS"):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    torch.manual_seed(1)
    extra = {"task_type": task_type} if task_type else {"modules_to_save": ["classifier"]}
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0, **extra)
    model = peft.get_peft_model(model, lora)
    with torch.no_grad():  # LoRA's B starts at zero: make the adapters count from the first step
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    return model


def lora_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    config.bos_token_id = config.eos_token_id = None
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0,
                           fan_in_fan_out=True)  # fmt: skip
    return peft.get_peft_model(GPT2LMHeadModel(config), lora)


def settings(tmp_path, name, **overrides):
    return dict(
        output_dir=str(tmp_path / name), num_train_epochs=2, per_device_train_batch_size=8, learning_rate=1e-2,
        use_cpu=True, report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="steps", save_steps=4,
        seed=0, **overrides,
    )  # fmt: skip


def _trainable(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("make_model", [lora_bert, lora_gpt2], ids=["lora-bert-seq-cls", "lora-gpt2-lm"])
def test_hp_off_is_trainer_and_resumes_from_an_adapter_checkpoint(tmp_path, make_model):
    # Resuming refused every PEFT checkpoint ("has no model.safetensors": PEFT writes adapter_model.safetensors),
    # where Trainer resumes; and a LoRA GPT-2 was measured as a classifier (its energy read each position's own token).
    data = Tokens(lm=make_model is lora_gpt2)
    plain = Trainer(model=make_model(), args=TrainingArguments(**settings(tmp_path, "plain")), train_dataset=data)
    plain.train()
    ours = HeadPrepTrainer(
        model=make_model(), args=HeadPrepConfig(hp_epochs=0, **settings(tmp_path, "ours")), train_dataset=data
    )
    ours.train()
    assert _trainable(plain.model).keys() == _trainable(ours.model).keys()
    assert all(torch.equal(a, b) for a, b in zip(_trainable(plain.model).values(), _trainable(ours.model).values()))
    losses = [[r["loss"] for r in t.state.log_history if "loss" in r] for t in (plain, ours)]
    assert losses[0] == losses[1]
    assert ("energy" in ours.dynamics) == (make_model is lora_bert)  # a LoRA causal LM is a language model
    resumed = HeadPrepTrainer(
        model=make_model(), args=HeadPrepConfig(hp_epochs=0, **settings(tmp_path, "ours")), train_dataset=data
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "ours" / "checkpoint-4"))
    assert all(torch.equal(a, b) for a, b in zip(_trainable(ours.model).values(), _trainable(resumed.model).values()))


@pytest.mark.parametrize("task_type", ["SEQ_CLS", None], ids=["seq-cls", "no-task-type"])
def test_hp_trains_the_wrapped_classifier_copy_and_measures_it(tmp_path, task_type):
    # The head was looked for on the PEFT wrapper, whose attribute `classifier` reaches the wrapped model's, but
    # whose parameters are named base_model.model.classifier...: no head parameter was found, and HP failed with an
    # error about tied weights; the head gradient norm went missing without a word.
    model = lora_bert(task_type)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = HeadPrepTrainer(model=model, args=HeadPrepConfig(hp_epochs=2, **settings(tmp_path, "hp")),
                              train_dataset=Tokens())  # fmt: skip
    assert trainer.split.head_names == ["base_model.model.classifier"]
    with pytest.warns(UserWarning, match="The prepared head is not written: the model is a PEFT model"):
        trainer.probe_head()
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {k for k in before if ".classifier.modules_to_save.default." in k}  # LoRA frozen in HP
    assert trainer.dynamics["energy"] > 0 and not (tmp_path / "hp" / "prepared_head").exists()
    trainer.finetune()
    assert trainer.dynamics["head_grad_norm"] and trainer.dynamics["drift"]


def test_resume_takes_the_head_named_either_way(tmp_path):
    # head_modules (and reinit_modules) name a PEFT model's modules as the wrapper's or the wrapped model's; a resume
    # naming them the other way was refused as "written with other settings", though the run is the same one.
    def model():
        torch.manual_seed(0)
        config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16, num_labels=2)  # fmt: skip
        lora = peft.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier", "pooler"])
        return peft.get_peft_model(BertForSequenceClassification(config), lora)

    run = settings(tmp_path, "run", hp_epochs=1, head_modules=["classifier"], reinit_modules=["bert.pooler"])
    first = HeadPrepTrainer(model=model(), args=HeadPrepConfig(**run), train_dataset=Tokens())
    first.train()
    checkpoint = str(tmp_path / "run" / "checkpoint-4")
    other = dict(run, head_modules=["base_model.model.classifier"], reinit_modules=["base_model.model.bert.pooler"])
    resumed = HeadPrepTrainer(model=model(), args=HeadPrepConfig(**other), train_dataset=Tokens())
    resumed.train(resume_from_checkpoint=checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(_trainable(first.model).values(), _trainable(resumed.model).values()))
    changed_head = dict(other, head_modules=["bert.pooler", "classifier"], reinit_modules=[])
    changed = HeadPrepTrainer(model=model(), args=HeadPrepConfig(**changed_head), train_dataset=Tokens())
    with pytest.raises(ValueError, match="other settings than this run's .*head_modules"):
        changed.train(resume_from_checkpoint=checkpoint)
