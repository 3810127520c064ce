"""Canaries: the `transformers.Trainer` internals HeadPrepTrainer still overrides or calls, pinned.

Each test fails loudly when the installed transformers changes what the trainer relies on, naming the override to
revisit, instead of letting training go silently wrong (e.g. losses divided by the accumulation steps twice).
"""

from __future__ import annotations

import inspect
import types

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerState
from transformers.utils import find_labels

from headprep_hf.schedules import stage_schedule


def _params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_loss_scaling_switch_is_read_by_training_step():
    # HeadPrepTrainer's compute_loss sets `loss_is_scaled_for_ga` for the loss it makes (scaled over the step's items)
    # and `_get_num_items_in_batch` restores the class's value for a subclass's own compute_loss; releases before 5.19
    # ignore it and would divide by the accumulation steps a second time. Read after compute_loss returns.
    assert Trainer.loss_is_scaled_for_ga is None
    source = inspect.getsource(Trainer.training_step)
    assert "self.loss_is_scaled_for_ga" in source
    assert source.index("self.compute_loss(") < source.index("self.loss_is_scaled_for_ga")


def test_prediction_step_reads_non_dict_outputs_as_loss_then_predictions():
    # headprep_hf.losses._checked_compute_loss refuses outputs returned as a bare tensor by a subclass's compute_loss
    # because prediction_step slices them as (loss, *predictions); if this changes, revisit that check.
    source = inspect.getsource(Trainer.prediction_step)
    assert "self.compute_loss(" in source and "return_outputs=True" in source
    assert "logits = outputs[1:]" in source


def test_num_items_override_is_called_once_per_optimizer_step():
    # Override: HeadPrepTrainer._get_num_items_in_batch (items of the step's micro-batches, summed over ranks).
    assert _params(Trainer._get_num_items_in_batch) == ["self", "batch_samples", "device"]
    assert "self._get_num_items_in_batch(batch_samples, device)" in inspect.getsource(Trainer.get_batch_samples)
    assert "self.get_batch_samples(epoch_iterator, num_batches" in inspect.getsource(Trainer._run_epoch)


def test_output_dir_override_decides_where_checkpoints_go():
    # Override: HeadPrepTrainer._get_output_dir (probe_head() and finetune() checkpoint into output_dir/hp, /ft).
    assert _params(Trainer._get_output_dir) == ["self", "trial"]
    assert "self._get_output_dir(trial=trial)" in inspect.getsource(Trainer._save_checkpoint)


def test_initial_training_values_are_seven_in_this_order(tmp_path):
    # Override: HeadPrepTrainer.set_initial_training_values adds the HP steps to the plan Trainer computes.
    assert _params(Trainer.set_initial_training_values) == ["self", "args", "dataloader"]
    source = inspect.getsource(Trainer._inner_training_loop).replace(" ", "").replace("\n", "")
    expected = (
        "num_train_epochs,num_update_steps_per_epoch,num_examples,num_train_samples,total_train_batch_size,"
        "steps_in_epoch,max_steps,)=self.set_initial_training_values(args,train_dataloader)"
    )
    assert expected in source


def test_grad_norm_of_every_update_goes_through_get_grad_norm_before_the_pre_optimizer_callback():
    # Override: HeadPrepTrainer._get_grad_norm hands Trainer's per-update gradient norm to the non-finite guard, which
    # otherwise computes its own (tests/test_guard.py checks that it does not).
    assert _params(Trainer._get_grad_norm) == ["self", "model", "grad_norm"]
    source = inspect.getsource(Trainer._inner_training_loop) + inspect.getsource(Trainer._run_epoch)
    source = source.replace(" ", "")
    call, callback = "grad_norm=self._get_grad_norm(model,grad_norm=grad_norm)", "on_pre_optimizer_step("
    assert call in source and source.index(call) < source.index(callback)


def test_dataloader_builder_signature():
    # Called by HeadPrepTrainer.measurement_loader: Trainer's loader (column removal, workers, Accelerate sharding),
    # and by HeadPrepTrainer.get_eval_dataloader with Trainer's evaluation sampler, for a dataset passed as an object
    # under persistent workers, which Trainer caches under "eval" whatever the dataset.
    assert _params(Trainer._get_dataloader)[:4] == ["self", "dataset", "description", "batch_size"]
    assert "sampler_fn" in _params(Trainer._get_dataloader)
    assert _params(Trainer._get_eval_sampler)[:2] == ["self", "eval_dataset"]
    assert 'dataloader_key = eval_dataset if isinstance(eval_dataset, str) else "eval"' in inspect.getsource(
        Trainer.get_eval_dataloader
    )


def test_model_init_goes_through_call_model_init():
    # Override: HeadPrepTrainer.call_model_init prepares the head of every model model_init builds.
    assert "self.call_model_init(trial)" in inspect.getsource(Trainer.train)


def test_state_and_callback_fields_reset_at_the_stage_boundary():
    # StageCallback resets best-model tracking and EarlyStoppingCallback's patience when FT begins.
    state = TrainerState()
    assert all(hasattr(state, name) for name in ("best_metric", "best_global_step", "best_model_checkpoint"))
    assert EarlyStoppingCallback(early_stopping_patience=2).early_stopping_patience_counter == 0


def test_labels_are_found_from_the_forward_signature():
    class WithLabels(torch.nn.Module):
        def forward(self, x, labels=None):
            return x

    class Positional(torch.nn.Module):
        def forward(self, x):
            return x

    assert find_labels(WithLabels) == ["labels"] and find_labels(Positional) == []


def test_lambda_lr_does_not_restore_the_attributes_of_partials():
    # The two-stage schedule's lambdas are partials so that a resumed run keeps its own schedule length
    # (LambdaLR.load_state_dict restores the __dict__ of callable objects).
    schedule = stage_schedule(2, 0.1, lambda s: 1.0, 0.01, lambda s: 0.5)
    assert not isinstance(schedule, types.FunctionType) and schedule.__dict__ == {}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule])
    assert scheduler.state_dict()["lr_lambdas"] == [{}]


def test_persistent_loader_keeps_its_iterator_where_release_workers_stops_it():
    # Used by: headprep_hf.trainer.shutdown_persistent_workers (HeadPrepTrainer.release_workers).
    import torch.utils.data as data

    loader = data.DataLoader(list(range(8)), batch_size=4, num_workers=1, persistent_workers=True)
    assert [batch.tolist() for batch in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert isinstance(loader._iterator, data.dataloader._MultiProcessingDataLoaderIter)
    workers = list(loader._iterator._workers)
    loader._iterator._shutdown_workers()
    assert not any(w.is_alive() for w in workers)
    # Trainer keeps persistent evaluation loaders here (release_workers stops them after an evaluation).
    assert "self._eval_dataloaders[dataloader_key] = dataloader" in inspect.getsource(Trainer._get_dataloader)


def test_timm_config_writer_is_the_one_save_for_hf_uses(tmp_path):
    # headprep_hf.export.write_timm_config calls timm.models._hub.save_config_for_hf (the config half of
    # save_for_hf) beside the Trainer's weights: its folder must hold exactly the config save_for_hf writes.
    import json

    import timm
    from timm.models._hub import save_config_for_hf

    from headprep_hf.export import set_data_config, set_label_names, write_timm_config

    assert _params(save_config_for_hf)[:5] == ["model", "config_path", "model_config", "model_args", "data_config"]
    model = timm.create_model("test_resnet", num_classes=2)
    set_label_names(model, ["a", "b"])
    data_config = dict(input_size=(3, 32, 32), interpolation="bicubic", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    set_data_config(model, {**data_config, "crop_pct": 0.9, "crop_mode": "center"})
    write_timm_config(model, tmp_path)
    timm.models.save_for_hf(
        model,
        str(tmp_path / "timm"),
        model_config={"label_names": ["a", "b"]},
        data_config={**data_config, "crop_pct": 0.9, "crop_mode": "center"},
        safe_serialization=True,
    )
    ours = json.loads((tmp_path / "config.json").read_text())
    assert ours == json.loads((tmp_path / "timm" / "config.json").read_text())


def test_progress_callback_draws_training_bar_and_counts_from_current_step():
    # Used by: headprep_hf.progress (the HP and FT bars). ProgressCallback draws `training_bar` at the start of
    # training, adds `state.global_step - current_step` to it at each step end and closes it at the end; the stage
    # bars relabel it, or replace it and set `current_step` where the new bar starts counting.
    import io

    from tqdm.auto import tqdm
    from transformers import ProgressCallback

    callback, state = ProgressCallback(), TrainerState(max_steps=5)
    state.is_world_process_zero = True
    callback.on_train_begin(None, state, None)
    assert callback.current_step == 0 and callback.training_bar.total == 5
    callback.training_bar.close()
    replacement = tqdm(total=3, file=io.StringIO())
    callback.training_bar, callback.current_step = replacement, 2
    state.global_step = 3
    callback.on_step_end(None, state, None)
    assert replacement.n == 1 and callback.current_step == 3
    callback.on_train_end(None, state, None)
    assert callback.training_bar is None and replacement.disable  # (tqdm marks a closed bar disabled)


def test_grad_scaler_keeps_its_scale_as_a_tensor():
    # Used by: headprep_hf.measurements.MeasurementCallback.record_head_grad (the head gradient norm under fp16 is
    # divided by the scale on the device; `get_scale()` reads it on the host).
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))
    assert isinstance(scaler._scale, torch.Tensor) and float(scaler._scale) == scaler.get_scale() == 1024.0


def test_the_best_model_is_loaded_through_load_best_model():
    # Overridden by HeadPrepTrainer._load_best_model (verifies the best checkpoint against its manifest first).
    assert "self._load_best_model()" in inspect.getsource(Trainer._finalize_training)
    assert _params(Trainer._load_best_model) == ["self"]


def test_an_evaluation_mode_prepare_marks_the_bare_model_prepared():
    # HeadPrepTrainer._unmark_evaluation_prepared_model undoes this before training (else `prepare` returns the model
    # without its DDP wrapper): accelerate's private `_is_accelerate_prepared` mark and `_models` list.
    from accelerate import Accelerator

    accelerator, model = Accelerator(cpu=True), torch.nn.Linear(2, 2)
    assert accelerator.prepare_model(model, evaluation_mode=True) is model
    assert model._is_accelerate_prepared is True and model in accelerator._models
    source = inspect.getsource(Accelerator.prepare_model)
    assert 'getattr(model, "_is_accelerate_prepared", False)' in source
    source = inspect.getsource(Trainer.evaluation_loop)
    assert "evaluation_mode=True" in source


def test_sharded_batches_without_padding_are_the_sequential_batches():
    # The BatchNorm-statistics pass sets `even_batches = False` on the measurement loader's sharded batch sampler:
    # the ranks' batches together must then be the sequential batches, each once (37 samples at 4 on 2 ranks).
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    batches = BatchSampler(SequentialSampler(range(37)), 4, drop_last=False)
    ranks = [list(BatchSamplerShard(batches, 2, rank, even_batches=True)) for rank in (0, 1)]
    assert ranks[1][-1] == [36, 0, 1, 2]  # the padding the pass must not count
    for rank in (0, 1):
        shard = BatchSamplerShard(batches, 2, rank)
        shard.even_batches = False
        ranks[rank] = list(shard)
    assert sorted(ranks[0] + ranks[1]) == sorted(list(batches))


def test_a_selected_dataset_keeps_its_rows_as_a_one_column_index_table():
    # data.images.rows_digest takes a `select`/`shuffle`'s rows from `Dataset._indices` (datasets' private index
    # mapping) and the stored table from `Dataset.data.table`; another layout falls back to the slow path.
    import datasets

    data = datasets.Dataset.from_dict({"x": list(range(10))})
    assert data._indices is None
    chosen = data.select([3, 1, 4])
    assert chosen._indices.num_columns == 1 and chosen._indices.column(0).to_pylist() == [3, 1, 4]
    assert chosen.data.table.column("x").to_pylist() == list(range(10))


def test_evaluations_are_reported_to_the_search_through_report_to_hp_search():
    # Override: HeadPrepTrainer._report_to_hp_search (HP's evaluations are not reported; FT's at FT's own step).
    assert _params(Trainer._report_to_hp_search) == ["self", "trial", "step", "metrics"]
    assert "self._report_to_hp_search(trial, self.state.global_step, metrics)" in inspect.getsource(Trainer._evaluate)


def test_a_trials_settings_are_applied_before_the_accelerator_is_built_anew():
    # Override: HeadPrepTrainer.create_accelerator_and_postprocess checks the config first, so that DDP's
    # find_unused_parameters follows a search trial's hp_epochs, which _hp_search_setup sets just before.
    source = inspect.getsource(Trainer._hp_search_setup)
    assert source.index("setattr(self.args, key, value)") < source.index("self.create_accelerator_and_postprocess()")
    assert "self.args.ddp_find_unused_parameters" in inspect.getsource(Trainer._build_accelerator_args)
