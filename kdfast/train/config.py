"""Config files for the command line: YAML or TOML, ``--set a.b=value`` overrides, typed sections,
model specs, and the optional dependencies each of them needs."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import typing
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from .models import GPT, GPTConfig


def require(module: str, extra: str, purpose: str):
    """Imports an optional dependency, or fails with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{purpose} needs the '{module.split('.')[0]}' package: pip install 'kdfast[{extra}]'") \
            from exc


def load_config(path: Union[str, Path]) -> dict:
    """A YAML (.yaml/.yml) or TOML (.toml) file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            tomllib = require("tomli", "demo", "reading TOML configs on Python 3.10")
        config = tomllib.loads(path.read_text())
    elif path.suffix in (".yaml", ".yml"):
        config = _yaml_load(path.read_text(), "reading YAML configs")
    else:
        raise ValueError(f"config file {path} must end in .yaml, .yml or .toml")
    if not isinstance(config, dict):
        raise ValueError(f"config file {path} must hold a mapping at its top level")
    return config


# Numbers with an exponent and no dot (1e-3, 2E+5): YAML 1.2 reads them as numbers, PyYAML (YAML 1.1) as text.
EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _yaml_load(text: str, purpose: str) -> Any:
    """YAML as safe_load reads it, except that 1e-3 is a number."""
    yaml = require("yaml", "demo", purpose)

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789"))
    return yaml.load(text, Loader=Loader)


def _parse_value(text: str) -> Any:
    try:
        return _yaml_load(text, "--set")
    except ImportError:
        try:
            return json.loads(text)
        except ValueError:
            return text


def apply_overrides(config: dict, assignments: list[str]) -> dict:
    """Sets ``a.b.c=value`` items (values parsed as YAML: 3, 1e-3, true, [1, 2], text) in config."""
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE with a dotted KEY (e.g. train.steps=100), got {item!r}")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section of the config")
        node[leaf] = _parse_value(value)
    return config


def section(config: dict, name: str, required: bool = False) -> dict:
    value = config.get(name)
    if value is None:
        if required:
            raise ValueError(f"the config has no '{name}' section")
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"config section '{name}' must be a mapping, got {value!r}")
    return value


def check_keys(values: dict, allowed, where: str) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in '{where}'; known: {', '.join(sorted(allowed))}")


def _number(value: Any, kind: type, key: str) -> Union[int, float]:
    expected = "an integer" if kind is int else "a number"
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"{key} must be {expected}, got {value!r}") from None
    if kind is int and isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or (kind is int and isinstance(number, float)):
        raise ValueError(f"{key} must be {expected}, got {value!r}")
    return kind(number)


def _convert(value: Any, kind: Any, key: str) -> Any:
    """value as the type ``kind`` of a dataclass field (int, float, bool, str, tuple[...], Optional[...]),
    or a ValueError naming key and the type expected: a config may give 1e-3 as text, or 1000 as 1000.0."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:  # Optional[X]: None or an X
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return _convert(value, rest[0], key) if len(rest) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        kinds = [args[0]] * len(value) if args[-1:] == (Ellipsis,) else args
        if len(value) != len(kinds):
            raise ValueError(f"{key} must be a list of {len(kinds)}, got {value!r}")
        return tuple(_convert(v, k, f"{key}[{i}]") for i, (v, k) in enumerate(zip(value, kinds)))
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if kind in (int, float):
        return _number(value, kind, key)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a name or path that YAML read as a number
    return value


def build(cls, values: dict, where: str, **fixed):
    """cls(**values, **fixed) for a dataclass, each value converted to its field's type, rejecting keys it does
    not have and values that do not convert with an error naming the key."""
    check_keys(values, [f.name for f in dataclasses.fields(cls)], where)
    kinds = typing.get_type_hints(cls)
    converted = {name: _convert(value, kinds[name], f"{where}.{name}") for name, value in values.items()}
    try:
        return cls(**{**converted, **fixed})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"in '{where}': {exc}") from exc


def build_model(spec: dict, where: str, vocab_size: Optional[int] = None) -> nn.Module:
    """A model from a config spec, one of:

    - ``{gpt: {n_layer: 2, d_model: 128, ...}, weights: FILE}``: kdfast.train.models.GPT (vocab_size
      defaults to the tokenizer's); weights, optional, a safetensors file of its state dict;
    - ``{hf: NAME_OR_DIR}``: transformers.AutoModelForCausalLM.from_pretrained;
    - ``{hf_config: {model_type: llama, ...}}``: a randomly initialised transformers model.
    """
    kinds = [k for k in ("gpt", "hf", "hf_config") if k in spec]
    if len(kinds) != 1:
        raise ValueError(f"'{where}' must have exactly one of gpt, hf, hf_config; got {sorted(spec)}")
    check_keys(spec, [kinds[0], "weights"], where)
    if kinds[0] == "gpt":
        values = dict(spec["gpt"] or {})
        if vocab_size is not None:
            values.setdefault("vocab_size", vocab_size)
        if "vocab_size" not in values:
            raise ValueError(f"'{where}.gpt' needs a vocab_size (or data.vocab_size, or data.text and a tokenizer)")
        model = GPT(build(GPTConfig, values, f"{where}.gpt"))
    else:
        transformers = require("transformers", "hf", f"'{where}: {kinds[0]}'")
        if kinds[0] == "hf":
            model = transformers.AutoModelForCausalLM.from_pretrained(spec["hf"])
        else:
            values = dict(spec["hf_config"])
            model_type = values.pop("model_type", None)
            if model_type is None:
                raise ValueError(f"'{where}.hf_config' needs a model_type (e.g. llama, gpt2)")
            if vocab_size is not None:
                values.setdefault("vocab_size", vocab_size)
            config = transformers.AutoConfig.for_model(model_type, **values)
            model = transformers.AutoModelForCausalLM.from_config(config)
    if spec.get("weights"):
        load_weights(model, spec["weights"])
    return model


def save_weights(model: nn.Module, path: Union[str, Path], state_dict: Optional[dict] = None) -> None:
    """model's weights (or state_dict, e.g. a sharded model's gathered one) as a safetensors file, tied weights
    once, as safetensors.torch.save_model writes them."""
    class Weights(nn.Module):
        def state_dict(self, *args, **kwargs) -> dict:
            return dict(state_dict)

    require("safetensors.torch", "demo", "saving model weights").save_model(
        model if state_dict is None else Weights(), str(path))


def load_weights(model: nn.Module, path: Union[str, Path]) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    missing, unexpected = require("safetensors.torch", "demo", "loading model weights").load_model(
        model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(f"weights file {path} does not fit the model: missing {missing}, unexpected {unexpected}")
