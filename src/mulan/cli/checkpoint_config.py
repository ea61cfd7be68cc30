"""The configuration saved in a checkpoint, and how the configuration given on top of it differs.

``mulan-cli test/validate/predict --ckpt_path X`` (and a resumed ``fit``) rebuild the model and the data from the
hyper-parameters saved in ``X`` (:func:`saved_configs`) and refuse model options that would change the bound
(:func:`model_differences`; :data:`EVALUATION_OPTIONS` are the ones that may change).
"""

from __future__ import annotations

from typing import Any

from mulan.lightning.loading import saved_config

EVALUATION_OPTIONS = {
    "sample_steps",
    "sampler",
    "optimizer",
    "lr_scheduler",
    "process_lr",
    "process_weight_decay",
    "time_sampler",
}
"""Model options that do not change the model's bound, so evaluation (and a resumed fit) may change them freely.

Everything else defines the bound and is refused when it differs from the checkpoint's: the process (its class and
every option, e.g. ``gamma_min``), the latent (its class, ``m``, ``k``, ...), ``timesteps``, the parameterisation,
the denoiser and its options, ``channels_last`` is harmless but kept strict. The time sampler is here: it draws the
times of the one-sample estimate with importance weights ``1/pi(t)``, so the estimate's expectation, the bound, is
the same whatever the sampler (docs: math, section 6c); only its variance, and so the reported standard error,
changes. The optimiser, its schedule and the process's learning rate and weight decay only act in training, and
the sampler and its step count only in ``predict``."""


def saved_configs(checkpoint: dict[str, Any], source: str, trusted: list[str]) -> dict[str, dict[str, Any]]:
    """The checkpoint's ``{"model": ..., "data": ...}`` configuration (``class_path`` form; a key is missing when
    the checkpoint saved none), its class paths checked against the allowed ones (``trusted`` added) before any of
    them is imported.

    Raises:
        ValueError: one line naming a refused class path and ``source``.
    """
    configs = {}
    for key, saved in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        leave_out = ("image_shape",) if key == "model" else ()  # a link target: it comes from the data
        config = saved_config(checkpoint.get(saved) or {}, source, trusted, leave_out)
        if config is not None:
            configs[key] = config
    return configs


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (a parsed configuration) as ``{"a.b.c": leaf}``."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def model_differences(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """``"option: saved -> given"`` for every model option that differs, evaluation-only options excepted."""
    a, b = _flatten(saved), _flatten(given)
    lines = []
    for key in sorted(set(a) | set(b)):
        option = key.removeprefix("init_args.").split(".")[0]
        if option in EVALUATION_OPTIONS or option == "image_shape" or a.get(key) == b.get(key):
            continue
        lines.append(f"model.{key}: {a.get(key)!r} in the checkpoint -> {b.get(key)!r} given")
    return lines
