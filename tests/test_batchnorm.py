"""BatchNorm statistics of the HP-trained modules are recomputed for the prepared head (hp_recompute_bn_stats)."""

import pytest
import torch
from conftest import bn_head_model, clone_state, make_config, tiny_timm
from torch import nn

from headprep_hf import HeadPrepTrainer


def features(model, x):
    model.eval()
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def stats_by_hand(model, x, batch_size):
    """Mean of the batch means and of the unbiased batch variances of the BatchNorm's input, sequential batches."""
    with torch.no_grad():
        h = model.fc[0](features(model, x))
    chunks = h.split(batch_size)
    mean = torch.stack([c.mean(0) for c in chunks]).mean(0)
    var = torch.stack([c.var(0, unbiased=True) for c in chunks]).mean(0)
    return mean, var, len(chunks)


def energy_by_hand(model, x, y):
    model.eval()
    with torch.no_grad():
        p = model(x).softmax(1)
    return (nn.functional.one_hot(torch.as_tensor(y), 3).float() - p).norm(dim=1).mean().item()


@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "cached"])
def test_head_bn_statistics_are_those_of_the_final_head(tmp_path, train_set, cache):
    model = bn_head_model()
    backbone_before = {k: v for k, v in clone_state(model.state_dict()).items() if not k.startswith("fc.")}
    args = make_config(tmp_path, hp_epochs=1, measure_batch_size=10, hp_cache_features=cache)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=train_set)
    trainer.probe_head()

    bn = model.fc[1]
    mean, var, batches = stats_by_hand(model, train_set.x, 10)  # 48 samples: batches of 10, 10, 10, 10, 8
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert int(bn.num_batches_tracked) == batches == 5  # the pass's batches, not the 3 HP updates
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone_before.items())  # the backbone is untouched
    # The measurements at FT start describe this head, in eval mode.
    assert trainer.dynamics["energy"] == pytest.approx(energy_by_hand(model, train_set.x, train_set.labels), rel=1e-5)


def test_switched_off_keeps_the_momentum_average(tmp_path, train_set):
    model = bn_head_model()
    args = make_config(tmp_path, hp_epochs=1, hp_recompute_bn_stats=False, measure_batch_size=10)
    HeadPrepTrainer(model=model, args=args, train_dataset=train_set).probe_head()
    assert int(model.fc[1].num_batches_tracked) == 3  # one per HP update (48 samples, batch 16)
    mean, _, _ = stats_by_hand(model, train_set.x, 10)
    assert not torch.allclose(model.fc[1].running_mean, mean, atol=1e-3)


def test_cached_and_uncached_bn_heads_agree(tmp_path, train_set):
    # The bias of the Linear in front of BatchNorm1d (fc.0.bias) does not change the head's output: BatchNorm
    # subtracts the batch mean in training and the running mean, recomputed after HP with that bias, in eval. Its
    # gradient is float rounding, which AdamW scales to full steps, so its value (and the running mean, which holds
    # it) follows the rounding of each path: with one thread per process the two paths' biases came out unrelated.
    # Compared: every other tensor, the running mean net of that bias, and the head's outputs.
    states, outputs = [], []
    for cache in (False, True):
        model = bn_head_model()
        args = make_config(tmp_path / str(cache), hp_epochs=3, hp_cache_features=cache, measure_batch_size=20)
        HeadPrepTrainer(model=model, args=args, train_dataset=train_set).probe_head()
        state = {k: v.float() for k, v in model.state_dict().items() if k.startswith("fc.")}
        state["fc.1.running_mean"] = state["fc.1.running_mean"] - state.pop("fc.0.bias")
        states.append(state)
        with torch.no_grad():
            outputs.append(model.eval()(train_set.x))
    for key in states[0]:
        assert torch.allclose(states[0][key], states[1][key], rtol=1e-4, atol=1e-5), key
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)


def test_train_recomputes_at_the_stage_switch(tmp_path, train_set):
    """train() (HP then FT in one loop) measures the same prepared head as probe_head() followed by finetune()."""
    energies = []
    for one_call in (True, False):
        model = bn_head_model()
        args = make_config(tmp_path / str(one_call), hp_epochs=2, num_train_epochs=1)
        trainer = HeadPrepTrainer(model=model, args=args, train_dataset=train_set)
        if one_call:
            trainer.train()
        else:
            trainer.probe_head()
            trainer.finetune()
        energies.append((trainer.dynamics["energy"], trainer.dynamics["hp_train_accuracy"]))
    assert energies[0][0] == pytest.approx(energies[1][0], rel=1e-6)
    assert energies[0][1] == energies[1][1]


def test_prepared_state_dict_leaves_the_live_statistics(tmp_path, train_set):
    model = bn_head_model()
    args = make_config(tmp_path, hp_epochs=1, measure_batch_size=20)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=train_set)
    trainer.probe_head()
    bn = model.fc[1]
    bn.running_mean.fill_(7.0)
    state = trainer.prepared_hp_state_dict()
    mean, _, _ = stats_by_hand(model, train_set.x, 20)
    assert torch.allclose(state["fc.1.running_mean"], mean, atol=1e-5)
    assert torch.all(bn.running_mean == 7.0)


def test_reinit_modules_statistics_are_recomputed(tmp_path, train_set):
    """Re-initialised backbone blocks train in HP too: their BatchNorm statistics are recomputed, the rest kept."""
    model = tiny_timm()
    before = clone_state(model.state_dict())
    args = make_config(tmp_path, hp_epochs=1, reinit_modules=["layer4"], measure_batch_size=10)
    HeadPrepTrainer(model=model, args=args, train_dataset=train_set).probe_head()
    after = model.state_dict()
    tracked = [k for k in after if k.startswith("layer4.") and k.endswith("num_batches_tracked")]
    assert tracked and all(int(after[k]) == 5 for k in tracked)  # the pass's 5 batches, not the 3 HP updates
    others = [k for k in after if not k.startswith(("layer4.", "fc."))]
    assert all(torch.equal(after[k], before[k]) for k in others)


def test_cached_sweep_snapshots_carry_recomputed_statistics(tmp_path, train_set, eval_set):
    """Snapshots taken inside cached HP (on the cache) equal standalone cached probe_head() runs, statistics too."""
    from conftest import CONFIG_DEFAULTS
    from safetensors.torch import load_file

    from headprep_hf import HeadPrepConfig, SweepConfig, TauSweep
    from headprep_hf.metrics import accuracy_metrics

    common = {k: v for k, v in CONFIG_DEFAULTS.items() if k != "hp_epochs"}
    common.update(hp_cache_features=True, measure_batch_size=10)
    args = SweepConfig(**common, output_dir=str(tmp_path / "sweep"), sweep_taus=[0, 1, 2], sweep_progress=False)
    result = TauSweep(bn_head_model(), args, train_set, eval_set, compute_metrics=accuracy_metrics()).run()
    for tau in (0, 1, 2):
        standalone = bn_head_model()
        config = HeadPrepConfig(**common, output_dir=str(tmp_path / f"hp{tau}"), hp_epochs=tau)
        HeadPrepTrainer(model=standalone, args=config, train_dataset=train_set).probe_head()
        snapshot = load_file(str(tmp_path / "sweep" / result["hp"]["seeds"]["0"]["snapshots"][str(tau)]))
        assert int(snapshot["fc.1.num_batches_tracked"]) == 5
        for key, value in snapshot.items():
            assert torch.equal(value, standalone.state_dict()[key]), (tau, key)


@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "cached"])
def test_a_last_batch_of_one_sample_is_left_out_of_the_recompute(tmp_path, train_set, cache):
    """48 samples at measure_batch_size 47: the pass's last batch holds one sample, which a train-mode BatchNorm1d
    cannot normalise (it raised "Expected more than 1 value per channel"); the statistics are those of the first 47."""
    model = bn_head_model()
    args = make_config(tmp_path, hp_epochs=1, measure_batch_size=47, hp_cache_features=cache)
    HeadPrepTrainer(model=model, args=args, train_dataset=train_set).probe_head()
    bn = model.fc[1]
    mean, var, _ = stats_by_hand(model, train_set.x[:47], 47)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert int(bn.num_batches_tracked) == 1
