"""The LLaVE training loop's public entry: ``TrainConfig`` and ``train(cfg)``.

The loop lives in the package :mod:`llave_fast.training`, one module per concern, listed here from
the bottom (config: imports none of them) to the top (loop); each imports only modules listed
before it (tests/test_train.py checks it):

    config           TrainConfig (one field per ``llave-fast train`` flag) and the shipped presets
    console          rank 0's lines, the progress bar, the known warnings
    preempt          SIGTERM: Ctrl-C before the first step; then the steps done checkpointed, exit 143
    checks           option values that cannot work, refused before anything is read
    schedule         warm-up and cosine decay; steps from epochs, warm-up from warmup_ratio
    batches          the data order (a pure function of seed and step), grouped by modality or not
    deepspeed_setup  the process group, DeepSpeed's CPU op built once, the run's DeepSpeed config
    engine           the model, AdamW's parameter groups, deepspeed.initialize; what a run leaves in its process
    step             the step's loss: the fused cross-rank loss, LLaVE's micro-step negatives, a probe
    loading          the datasets and the per-step DataLoader
    resume           fresh start or resume (refusing options that would change the run), train_config.json
    run_folder       one run per folder, its default name, a failed start's leftovers removed
    runlog           train_log.jsonl and TensorBoard
    stops            stopping every rank at the same step on bad data or a non-finite loss
    report           the run's result and its summary
    heldout          precision@1 before and after training, eval.json
    loop             train(): the loop itself, top to bottom

This module re-exports the names other code imports from ``llave_fast.train``. A test that
replaces a function the loop calls patches it in the training module that calls it.
"""

from __future__ import annotations


from .evaluate import encode_all, retrieval_eval  # noqa: F401  (re-exported)
from .training.batches import BatchOrder, _family_size, batch_indices, check_data_fit
from .training.checks import SYNTHETIC_ONLY, check_config, synthetic_only_options
from .training.config import CONFIG_DIR, TrainConfig, _config_dir, _config_path, _opt
from .training.console import KNOWN_WARNINGS, _log, log, progress_line, quiet_known_warnings
from .training.deepspeed_setup import (
    _free_port,
    deepspeed_config,
    init_distributed,
    quiet_deepspeed_op_probe,
    warm_deepspeed_ops,
)
from .training.engine import build_model, param_groups, tiny_model_kwargs
from .training.loading import StepBatches, StepSampler, _datasets, _first, step_loader
from .training.loop import _train, train
from .training.report import _median, summary_text, task_table
from .training.resume import (
    RESUME_MAY_CHANGE,
    RESUME_NOT_COMPARED,
    ResumeRefused,
    _jsonable,
    _may_change_flags,
    plan_resume,
    resume_changes,
    write_run_config,
)
from .training.run_folder import (
    _HELD,
    _START_FILES,
    LOCK_FILE,
    RunFolderInUse,
    _forget_failed_start,
    _release_run_folder,
    _take_run_folder,
    agreed_output_dir,
    default_output_dir,
    hold_run_folder,
)
from .training.runlog import _append_log, _tensorboard, _truncate_log
from .training.schedule import resolve_length, resolve_warmup, warmup_cosine
from .training.step import MicroStepLoss, _LossProbe, _to_device
from .training.stops import RunStopped, _gather_objects, _last_checkpoint, _non_finite_message, _stop_if_asked

__all__ = [
    "BatchOrder", "CONFIG_DIR", "KNOWN_WARNINGS", "LOCK_FILE", "MicroStepLoss", "RESUME_MAY_CHANGE",
    "RESUME_NOT_COMPARED", "ResumeRefused", "RunFolderInUse", "RunStopped", "SYNTHETIC_ONLY", "StepBatches",
    "StepSampler", "TrainConfig", "agreed_output_dir", "batch_indices", "build_model", "check_config",
    "check_data_fit", "deepspeed_config", "default_output_dir", "hold_run_folder", "init_distributed",
    "param_groups", "plan_resume", "progress_line", "quiet_deepspeed_op_probe", "quiet_known_warnings",
    "resolve_length", "resolve_warmup", "resume_changes", "step_loader", "summary_text",
    "synthetic_only_options", "task_table", "tiny_model_kwargs", "train", "warm_deepspeed_ops",
    "warmup_cosine", "write_run_config",
]
