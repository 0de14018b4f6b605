"""MERIT and LAMB by name in DeepSpeed's JSON config, and a pre-flight check of that config.

DeepSpeed builds the optimizer named in ``"optimizer": {"type": NAME}``: its built-ins
(compared case-insensitively: ``adam``, ``adamw``, ``lamb``, ``lion``, ...), else
``getattr(torch.optim, NAME)`` (``runtime/engine.py:1985-1986`` accepts the name,
``:2548`` constructs it as ``torch_optimizer(model_parameters, **params)``). There is no
registry, and that lookup is case-sensitive. So ``import merit_ds`` sets
``torch.optim.<json_name>`` for every optimizer in merit_ds's registry that DeepSpeed does not
implement itself (``torch.optim.MERIT = MERIT``, ``torch.optim.ShardedLAMB = LAMB``, and any
optimizer registered later: :func:`install_json_names`), after which::

    "optimizer": {"type": "MERIT", "params": {"lr": 1e-3, "weight_decay": 0.1}},
    "zero_allow_untested_optimizer": true

(or ``"type": "ShardedLAMB"``) in a config trains with sharded MERIT (LAMB), exact under ZeRO.
LAMB cannot go by ``"lamb"``/``"Lamb"``: DeepSpeed maps any case of that name to its own
FusedLamb (CUDA-only; under ZeRO it computes trust ratios per flat partition, not per
tensor). DeepSpeed requires ``zero_allow_untested_optimizer`` under ZeRO for any optimizer it
did not write (``engine.py:2298-2301``), and ``"zero_force_ds_cpu_optimizer": false`` with
``offload_optimizer`` for a *client* optimizer instance only (``engine.py:2342-2346``;
accelerate instead silently swaps a client optimizer for DeepSpeedCPUAdam); an optimizer named
in the JSON runs under ZeRO-Offload without that key. :func:`check_config` reports exactly
these, with the fix, before DeepSpeed starts.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Mapping, Union

import torch

from merit_ds.optim import registry

from ._common import (ds_forces_cpu_optimizer, ds_offloads_optimizer, is_registered_class, json_name_of,
                      json_names)

__all__ = ["register_json_name", "install_json_names", "builtin_name_hint", "optimizer_value_error", "misspelled_keys", "known_deepspeed_keys", "check_config", "accepted_params", "install_initialize_check",
           "json_names", "MeritConfigError"]


class MeritConfigError(ValueError):
    """A DeepSpeed config that cannot run MERIT (or LAMB) as written; the message names the fix."""


def register_json_name(spec=None) -> None:
    """Make ``"type": spec.json_name`` resolvable by DeepSpeed (``getattr(torch.optim, NAME)``);
    without ``spec``, every registered optimizer's. Refuses to shadow a different class."""
    todo = [spec] if spec is not None else list(registry.specs())
    todo = [s for s in todo if s.ds_route != "deepspeed"]
    for s in todo:
        existing = getattr(torch.optim, s.json_name, None)
        if existing is not None and existing is not s.cls and getattr(existing, "__module__", "") != s.cls.__module__:
            raise RuntimeError(f"torch.optim.{s.json_name} is already taken by {existing!r}")
    for s in todo:
        setattr(torch.optim, s.json_name, s.cls)


def install_json_names() -> None:
    """Keep ``torch.optim`` in step with the registry: every optimizer registered now or later
    gets its JSON name (called once by ``import merit_ds``)."""
    registry.on_register(register_json_name)


def _load(config: Union[str, os.PathLike, Mapping[str, Any]]) -> Mapping[str, Any]:
    """The config as DeepSpeed reads it (``runtime/config.py``, ``DeepSpeedConfig``): a mapping as
    is; a path to an existing file parsed with hjson (JSON plus comments and trailing commas);
    otherwise a base64-encoded config."""
    if isinstance(config, Mapping):
        return config
    import hjson  # a DeepSpeed dependency

    if os.path.exists(config):
        with open(config) as f:
            return hjson.load(f)
    import base64
    import binascii

    try:
        return hjson.loads(base64.urlsafe_b64decode(str(config)).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise FileNotFoundError(f"no DeepSpeed config at {config!s} (not a file, not a base64 config)") from None


def accepted_params(cls: type) -> list[str]:
    """The keyword arguments ``cls`` (MERIT, LAMB) accepts besides ``params``: what may appear in
    the JSON's ``"optimizer": {"params": {...}}`` (DeepSpeed passes them as ``cls(groups, **params)``).
    Read from the constructor's signature, so a new optimizer or argument needs no edit here."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    sig = inspect.signature(cls.__init__)
    return [n for n, p in sig.parameters.items() if n not in ("self", "params") and p.kind in kinds]


# Keys an AdamW/Adam/SGD template leaves behind, with what they mean for MERIT/LAMB.
_LEFTOVER_HINTS = {
    "torch_adam": "DeepSpeed reads it for its own Adam/AdamW only",
    "adam_w_mode": "DeepSpeed reads it for its own Adam/AdamW only; decay is always decoupled here",
    "momentum": "the first-moment coefficient is betas[0]",
    "amsgrad": "not supported",
    "fused": "not supported; implementation='foreach' is the fast path",
}


def _unknown_params_error(name: str, cls: type, params: Mapping[str, Any]) -> MeritConfigError | None:
    accepted = accepted_params(cls)
    unknown = [k for k in params if k not in accepted]
    if not unknown:
        return None
    hints = "; ".join(f"{k}: {_LEFTOVER_HINTS[k]}" for k in unknown if k in _LEFTOVER_HINTS)
    return MeritConfigError(
        f'"optimizer": {{"type": "{name}"}} does not accept params key{"s" if len(unknown) > 1 else ""} '
        f"{', '.join(repr(k) for k in unknown)}; accepted: {', '.join(accepted)}"
        + (f" ({hints})" if hints else "")
        + f". DeepSpeed would call {cls.__name__}(groups, **params) and fail with a TypeError inside "
        "deepspeed.initialize; remove the key(s)."
    )


def optimizer_value_error(cls: type, params: Mapping[str, Any]) -> str | None:
    """What ``cls`` (its own validation, the rules it applies when built in Python) says of these
    hyperparameter values, tried on a throw-away parameter; None if it takes them. ``"auto"``
    values are left out (the HF Trainer fills them in later)."""
    values = {k: (tuple(v) if k == "betas" and isinstance(v, list) else v) for k, v in params.items() if v != "auto"}
    try:
        cls([torch.zeros(1, requires_grad=True)], **values)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def _bad_values_error(name: str, cls: type, params: Mapping[str, Any]) -> MeritConfigError | None:
    error = optimizer_value_error(cls, params)
    if error is None:
        return None
    return MeritConfigError(f'"optimizer": {{"type": "{name}", "params": ...}}: {error}. Fix the value in the '
                            "DeepSpeed config.")


def _fused_lamb_error(name: str) -> MeritConfigError:
    return MeritConfigError(
        f'"type": "{name}" is DeepSpeed\'s own FusedLamb (DeepSpeed compares its built-in names '
        "case-insensitively), not merit_ds's LAMB: FusedLamb is CUDA-only (a fused kernel built "
        "with FusedLambBuilder; it cannot run on CPU) and under ZeRO it computes one trust ratio per "
        "flat partition instead of per tensor, which is not LAMB. For LAMB exact under ZeRO 1/2/3 "
        f'write "type": "{registry.get("lamb").json_name}" (after "import merit_ds"), with '
        '"zero_allow_untested_optimizer": true.'
    )


def builtin_name_hint(type_name: str) -> str | None:
    """Why a DeepSpeed JSON ``"type"`` that DeepSpeed resolves itself is not the merit_ds optimizer a
    user probably meant, or None: ``"lamb"`` (any case) is DeepSpeed's FusedLamb; ``"adam"`` is not
    the AdamW baseline."""
    name = str(type_name).lower()
    if name == "lamb":
        return (f"optimizer type {type_name!r}: DeepSpeed's built-in Lamb (FusedLamb) computes its trust ratios per "
                f"ZeRO partition, not per tensor; merit_ds's exact LAMB is named \"{registry.get('lamb').json_name}\" "
                f"(or leave the section out and pass --optimizer lamb)")
    if name == "adam":
        return 'optimizer type "Adam": the AdamW baseline is named "AdamW" (decoupled weight decay)'
    return None


def known_deepspeed_keys() -> frozenset:
    """Every config key name DeepSpeed declares: the lower-case string values of the UPPER_CASE
    constants of its config modules (``deepspeed/runtime/constants.py`` and the modules
    ``deepspeed.runtime.config`` imports), read from DeepSpeed itself, not listed here."""
    import re
    import sys

    import deepspeed.runtime.config  # noqa: F401  (imports the config modules of every feature)

    keys = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("deepspeed") or module is None:
            continue
        for attr, value in vars(module).items():
            if attr.isupper() and isinstance(value, str) and re.fullmatch(r"[a-z][a-z0-9_]*", value):
                keys.add(value)
    return frozenset(keys)


def misspelled_keys(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, nearest known key)`` for each top-level key of ``cfg`` that DeepSpeed does not know
    but that is one or two letters from one it does (``zero_optimisation``): DeepSpeed ignores
    unknown keys silently, so such a typo runs without the section it meant."""
    import difflib

    known = known_deepspeed_keys()
    out = []
    for key in cfg:
        if isinstance(key, str) and key not in known:
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
            if near:
                out.append((key, near[0]))
    return out


def check_config(config: Union[str, os.PathLike, Mapping[str, Any]], *, client_optimizer: Any = False) -> None:
    """Raise :class:`MeritConfigError` if DeepSpeed would refuse (or silently replace) MERIT/LAMB.

    ``config`` is the DeepSpeed config (dict or JSON path). The checks apply when the config
    names ``"MERIT"`` or ``"ShardedLAMB"``, or when ``client_optimizer`` is set: ``True`` (a
    merit_ds optimizer instance passed to ``deepspeed.initialize(optimizer=...)``), or that
    optimizer's class or instance (named in the messages). Also refused: a wrongly cased name
    (``"merit"``, ``"shardedlamb"``) and, under ZeRO, ``"lamb"`` in any case (DeepSpeed's
    FusedLamb, whose ratios are per partition there). A no-op for other configs.
    """
    cfg = _load(config)
    typos = misspelled_keys(cfg) if (client_optimizer or _names_ours_in_any_case(cfg)) else []
    if typos:
        raise MeritConfigError("DeepSpeed ignores keys it does not know, silently: " + "; ".join(
            f'"{key}" is not a DeepSpeed key (did you mean "{near}"?)' for key, near in typos) + ". Fix the spelling.")
    opt = cfg.get("optimizer") or {}
    name = opt.get("type")
    zero = cfg.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0) or 0)
    named = None
    if name is not None:
        for json_name, cls in json_names().items():
            if name == json_name:
                named = cls
            elif str(name).lower() == json_name.lower():
                raise MeritConfigError(
                    f'DeepSpeed looks optimizer names up case-sensitively: write "type": "{json_name}", not "{name}".'
                )
        if str(name).lower() == "lamb" and stage > 0:
            raise _fused_lamb_error(name)
    if named is None and not client_optimizer:
        return
    if named is not None:
        what = json_name_of(named)
    elif client_optimizer is True:
        what = "MERIT"
    else:
        cls = client_optimizer if isinstance(client_optimizer, type) else type(client_optimizer)
        what = json_name_of(cls) if is_registered_class(cls) else cls.__name__
    if stage > 0 and not cfg.get("zero_allow_untested_optimizer", False):
        raise MeritConfigError(
            f'{what} under ZeRO needs "zero_allow_untested_optimizer": true at the top level of the DeepSpeed '
            "config (DeepSpeed only trusts its own optimizers by default; merit_ds makes MERIT and LAMB exact "
            "under ZeRO 1/2/3)."
        )
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    # DeepSpeed enforces zero_force_ds_cpu_optimizer for client optimizers only (engine.py:2342-2346,
    # in the client branch of _configure_optimizer); Accelerate swaps only client optimizers
    # (accelerator.py:2374-2383, not DummyOptim). A JSON-named MERIT/LAMB runs without the key.
    if client_optimizer and stage > 0 and ds_offloads_optimizer(cfg) and ds_forces_cpu_optimizer(cfg):
        raise MeritConfigError(
            f'a client {what} optimizer (an instance passed to deepspeed.initialize or accelerator.prepare) with '
            '"offload_optimizer" needs "zero_force_ds_cpu_optimizer": false at the top level of the DeepSpeed '
            "config: without it DeepSpeed raises ZeRORuntimeException for any client optimizer under "
            f"ZeRO-Offload, and accelerate (and the HF Trainer) silently replace {what} with DeepSpeedCPUAdam. "
            f'Alternatively name it in the config ("optimizer": {{"type": "{what}"}}): DeepSpeed enforces the key '
            "for client optimizers only."
        )
    if offload == "nvme":
        raise MeritConfigError(
            f"{what} is not supported with offload_optimizer.device=nvme (optimizer-state swapping); use cpu."
        )
    params = opt.get("params") or {}
    if params.get("max_grad_norm") is not None:
        raise MeritConfigError('use DeepSpeed\'s "gradient_clipping", not optimizer.params.max_grad_norm')
    if named is not None:
        error = _unknown_params_error(name, named, params)
        if error is not None:
            raise error
        error = _bad_values_error(name, named, params)
        if error is not None:
            raise error



def _config_of_initialize_call(signature: inspect.Signature, args: tuple, kwargs: dict):
    """The DeepSpeed config a ``deepspeed.initialize(...)`` call will use (dict or path), or None:
    ``config=``, else ``config_params=`` (its old name), else ``args.deepspeed_config``."""
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return None  # DeepSpeed will report the call itself
    for key in ("config", "config_params"):
        if bound.get(key) is not None:
            return bound[key]
    return getattr(bound.get("args"), "deepspeed_config", None)


def _names_ours_in_any_case(cfg: Any) -> bool:
    optimizer = cfg.get("optimizer") if isinstance(cfg, Mapping) else None
    name = optimizer.get("type") if isinstance(optimizer, Mapping) else None
    return name is not None and str(name).lower() in {n.lower() for n in json_names()}


def _warn_decayed_norms(signature: inspect.Signature, args: tuple, kwargs: dict, cfg):
    """Warn (once) when MERIT/LAMB, a client instance or named in ``cfg``, would decay normalization
    weights of ``model`` (:func:`.param_groups.warn_decayed_norms`). Returns the call's arguments,
    with a ``model_parameters`` generator turned into a list (it is read here and by DeepSpeed)."""
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return args, kwargs
    a = bound.arguments
    model, optimizer, params = a.get("model"), a.get("optimizer"), a.get("model_parameters")
    if model is None:
        return args, kwargs
    from merit_ds.optim import ShardableOptimizer

    from .param_groups import warn_decayed_norms

    try:
        if isinstance(optimizer, ShardableOptimizer):
            warn_decayed_norms(model, [(g.get("weight_decay", 0.0), optimizer.original_params(g))
                                       for g in optimizer.param_groups], type(optimizer).__name__, "deepspeed.initialize")
        elif optimizer is None and params is not None and isinstance(cfg, Mapping) and _names_ours_in_any_case(cfg):
            if not isinstance(params, (list, tuple)):
                params = a["model_parameters"] = list(params)
                args, kwargs = bound.args, bound.kwargs
            json_wd = ((cfg.get("optimizer") or {}).get("params") or {}).get("weight_decay", 0.0)
            groups = ([(g.get("weight_decay", json_wd), g["params"]) for g in params] if params and
                      isinstance(params[0], dict) else [(json_wd, params)])
            named = (cfg.get("optimizer") or {}).get("type")
            warn_decayed_norms(model, groups, str(named), "deepspeed.initialize")
    except (TypeError, ValueError, KeyError, AttributeError):
        pass  # an unusual call: DeepSpeed itself will say what is wrong with it
    return args, kwargs


def _check_client_optimizer(signature: inspect.Signature, args: tuple, kwargs: dict, cfg):
    """A client optimizer that is not the JSON's: refused, or replaced when opted in
    (:mod:`.client_optimizer`). Returns the call's arguments."""
    from . import client_optimizer

    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return args, kwargs
    if client_optimizer.resolve(cfg, bound.arguments):
        check_config(cfg, client_optimizer=bound.arguments["optimizer"])  # a client instance now
        return bound.args, bound.kwargs
    return args, kwargs


def install_initialize_check(module=None) -> None:
    """Run :func:`check_config` inside ``deepspeed.initialize`` before the engine is built, for a
    config whose ``"optimizer": {"type": ...}`` is ``MERIT`` / ``ShardedLAMB`` in any case.

    Without it a script that writes ``"type": "merit"`` gets DeepSpeed's bare "merit is not a
    supported DeepSpeed Optimizer", and a leftover ``"momentum"`` in the params a ``TypeError``
    from ``MERIT.__init__`` deep inside the engine; with it, one :class:`MeritConfigError` that
    names the fix, on every rank, before anything is built. Configs naming any other optimizer
    (DeepSpeed's own included) pass through untouched. Installed at ``import merit_ds`` (through
    :mod:`.trainer_guard_hook`, when ``deepspeed`` is imported); ``MERIT_DS_NO_DEEPSPEED_CHECK=1``
    disarms it. Idempotent.
    """
    import functools

    if module is None:
        import deepspeed as module
    original = module.initialize
    if getattr(original, "_merit_ds_checked", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def initialize(*args, **kwargs):
        config = _config_of_initialize_call(signature, args, kwargs)
        cfg = None
        if config is not None:
            try:
                cfg = _load(config)
                if _names_ours_in_any_case(cfg):
                    check_config(cfg)
            except MeritConfigError:
                raise
            except Exception:  # noqa: BLE001 - unreadable or malformed: DeepSpeed's own error says what
                cfg = None
        if cfg is not None and _names_ours_in_any_case(cfg):
            args, kwargs = _check_client_optimizer(signature, args, kwargs, cfg)
        args, kwargs = _warn_decayed_norms(signature, args, kwargs, cfg)
        return original(*args, **kwargs)

    initialize._merit_ds_checked = True
    module.initialize = initialize

