"""Several PEFT methods in one model: `ConfigUnion(a, b, ...)`, peft_type "UNION" (ours, after
AdapterHub's `ConfigUnion`). Each component is patched by its own method module, as
`peftkern.patch` would patch it alone, into the one patch record of the model, so `unpatch`
undoes all of them, newest first.

Every component is planned (checked) against the unpatched model, and the components' claims are
checked against each other, before anything changes. What composes (docs/hybrids.md):
- layer methods (LoRA, IA³) replace a Linear; two of them on the same Linear do not compose
  (peftkern has no layer holding both), so that is refused;
- a bottleneck adapter wraps a whole sublayer (`mlp`, `self_attn`, ...): layer methods inside it
  compose (LoRA inside, the adapter around); two bottleneck components at the same site are
  refused (AdapterHub's rule: same architecture only at disjoint sites);
- prompt learning (prefix, prompt tuning) hooks the model's forward: one per union.
Components are applied layer methods first, then bottleneck sites, then prompt learning (a site
wrapper would hide a Linear from a later layer method's swap by name).

Each component is an adapter of its own inside the model, named `<adapter_name>_<folder>`
(`components`), and is saved in its own folder in its own library's format (`peftkern.io`).
"""

from __future__ import annotations

import dataclasses

from . import method_module, resolve_config
from .bottleneck import ParBnConfig
from .prefix import PrefixTuningConfig

# peft_type -> how it changes the model: "layer" replaces Linears, "site" wraps sublayers,
# "model" hooks the model's forward. The order of application is this order.
KINDS = {"LORA": "layer", "IA3": "layer", "BOTTLENECK": "site", "PREFIX_TUNING": "model", "PROMPT_TUNING": "model"}
_ORDER = ("layer", "site", "model")


class ConfigUnion:
    """Several method configs applied together: `peftkern.patch(model, ConfigUnion(lora, adapter))`.
    Components: peftkern configs, `peft` config objects, AdapterHub bottleneck configs or dicts
    (anything `peftkern.patch` takes), of LoRA, IA³, bottleneck adapters, prefix or prompt
    tuning; a ConfigUnion among them is flattened into this one."""

    peft_type = "UNION"

    def __init__(self, *configs):
        self.configs = list(configs)

    @classmethod
    def from_any(cls, config) -> "ConfigUnion":
        """A fresh union of resolved, validated component configs, from a ConfigUnion or a dict
        {"peft_type": "UNION", "configs": [...]}."""
        if isinstance(config, ConfigUnion):
            parts = config.configs
        elif isinstance(config, dict) and isinstance(config.get("configs"), (list, tuple)):
            parts = config["configs"]
        else:
            raise TypeError(f"expected a ConfigUnion or a dict with 'configs', got {type(config).__name__}")
        resolved = []
        for index, part in enumerate(parts):
            if isinstance(part, ConfigUnion):
                resolved += cls.from_any(part).configs
                continue
            if not (isinstance(part, dict) or hasattr(part, "peft_type") or hasattr(part, "to_dict")):
                raise TypeError(f"ConfigUnion component {index} is a {type(part).__name__} ({part!r}), not a method config")
            _, component = resolve_config(part)
            resolved.append(component)
        return cls(*resolved)

    def validate(self) -> None:
        if not self.configs:
            raise ValueError("ConfigUnion needs at least one component config")
        for index, config in enumerate(self.configs):
            if config.peft_type not in KINDS:
                raise NotImplementedError(
                    f"ConfigUnion component {index} is {config.peft_type}; unions take {sorted(KINDS)} so far"
                )
            if config.peft_type == "LORA" and (config.bias != "none" or config.modules_to_save
                                               or config.classifier_heads()):  # fmt: skip
                raise NotImplementedError(f"ConfigUnion component {index} (LORA): bias, modules_to_save and task heads "
                                          "are not supported in unions yet")  # fmt: skip

    def to_dict(self) -> dict:
        """{"peft_type": "UNION", "configs": [each component's fields, with its peft_type]}: the
        dict form `from_any` (and so `peftkern.patch`) takes back."""
        return {"peft_type": self.peft_type,
                "configs": [{**dataclasses.asdict(c), "peft_type": c.peft_type} for c in self.configs]}  # fmt: skip

    def __repr__(self) -> str:
        return f"ConfigUnion({', '.join(type(c).__name__ for c in self.configs)})"


class MAMConfig(ConfigUnion):
    """The mix-and-match adapter (He et al., ICLR 2022) with AdapterHub's `MAMConfig` defaults:
    prefix tuning (30 virtual tokens, the MLP reparametrisation with 800 hidden units and tanh)
    plus a parallel adapter on the FFN (`ParBnConfig()`: reduction_factor=2, scaling=4.0,
    "mam_adapter" init). Either part may be given instead. The prefix is PEFT's (positions of the
    real tokens numbered from the prefix length; on grouped-query attention an embedding of
    [virtual tokens, KV width]), which is where it differs from AdapterHub's (docs/hybrids.md)."""

    def __init__(self, prefix_tuning=None, adapter=None):
        if prefix_tuning is None:
            prefix_tuning = PrefixTuningConfig(num_virtual_tokens=30, prefix_projection=True, encoder_hidden_size=800)
        super().__init__(prefix_tuning, adapter if adapter is not None else ParBnConfig())

    def __repr__(self) -> str:
        return f"MAMConfig({', '.join(type(c).__name__ for c in self.configs)})"


CONFIG = ConfigUnion


def components(union: ConfigUnion, adapter_name: str) -> list[tuple[str, str, object]]:
    """[(folder, adapter name inside the model, config)] in the union's order. The folder is the
    lower-case peft_type, numbered from the second of a kind on ("bottleneck", "bottleneck_1")."""
    seen: dict[str, int] = {}
    parts = []
    for config in union.configs:
        kind = config.peft_type.lower()
        count = seen.get(kind, 0)
        seen[kind] = count + 1
        folder = kind if count == 0 else f"{kind}_{count}"
        parts.append((folder, f"{adapter_name}_{folder}", config))
    return parts


def _inside(inner: str, outer: str) -> bool:
    return outer == "" or inner.startswith(f"{outer}.")


def check_conflicts(claims: list[tuple[str, str, tuple[str, ...]]]) -> None:
    """claims: [(component, kind, module names it changes)]. Raise, naming both components and the
    module, where two components claim a module in a way that does not compose."""
    for i, (first, first_kind, first_modules) in enumerate(claims):
        for second, second_kind, second_modules in claims[i + 1:]:
            if first_kind == second_kind == "model":
                raise ValueError(f"ConfigUnion: two prompt-learning components, {first!r} and {second!r}, both hook the "
                                 "model's forward; a union takes at most one")  # fmt: skip
            if "model" in (first_kind, second_kind):
                continue  # hooks on the model compose with any layer or site
            for a in first_modules:
                for b in second_modules:
                    if a == b:
                        what = ("both replace it" if first_kind == second_kind == "layer" else
                                "both wrap it" if first_kind == second_kind else "one replaces the module the other wraps")  # fmt: skip
                        raise ValueError(f"ConfigUnion: components {first!r} and {second!r} both claim module {a!r} "
                                         f"({what}), which does not compose")  # fmt: skip
                    # a layer inside a site composes (LoRA inside, the adapter around); a site
                    # inside a replaced layer, or nested sites, do not
                    nested = (a, b) if _inside(a, b) else (b, a) if _inside(b, a) else None
                    if nested is None:
                        continue
                    kinds = dict(((a, first_kind), (b, second_kind)))
                    inner, outer = nested
                    if not (kinds[inner] == "layer" and kinds[outer] == "site"):
                        raise ValueError(f"ConfigUnion: components {first!r} and {second!r} claim nested modules "
                                         f"{inner!r} inside {outer!r}, which does not compose")  # fmt: skip


def plan_patch(model, config: ConfigUnion, adapter_name: str, **options):
    """Plan every component against the unpatched model (each method's own checks), check the
    claims against each other, then return the function applying them in order. Options (e.g.
    quantize="nf4": QLoRA) go to the layer methods."""
    parts = components(config, adapter_name)
    if options and not any(KINDS[c.peft_type] == "layer" for _, _, c in parts):
        raise TypeError(f"patch options {sorted(options)} apply to LoRA / IA³ components; this union has none")
    planned = []
    for folder, name, component in parts:
        kind = KINDS[component.peft_type]
        plan = method_module(component.peft_type).plan_patch(model, component, name,
                                                             **(options if kind == "layer" else {}))  # fmt: skip
        planned.append((folder, kind, plan))
    check_conflicts([(folder, kind, plan.modules) for folder, kind, plan in planned])
    ordered = sorted(planned, key=lambda p: _ORDER.index(p[1]))  # stable: the union's order within a kind

    def apply(record) -> None:
        for _, _, plan in ordered:
            plan(record)

    return apply


def adapter_tensors(model, adapter_name: str):
    raise TypeError("a ConfigUnion has one checkpoint per component: peftkern.io.union_state_dicts(model, adapter_name)")
