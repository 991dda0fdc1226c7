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

A gated union (`use_gating=True`, UniPELT's; `UniPELTConfig`) gates every component, as
AdapterHub's `UniPELTConfig` sets use_gating on each: a learned gate per component and layer
(methods/gates.py) in LoRA, bottleneck adapters and prefix tuning (prompt tuning and IA³ have
none in AdapterHub, and are refused in a gated union).
"""

from __future__ import annotations

import dataclasses

from . import method_module, resolve_config
from .bottleneck import ParBnConfig, SeqBnConfig
from .lora import LoraConfig
from .prefix import PrefixTuningConfig

# peft_type -> how it changes the model: "layer" replaces Linears, "site" wraps sublayers,
# "model" hooks the model's forward. The order of application is this order.
KINDS = {"LORA": "layer", "IA3": "layer", "BOTTLENECK": "site", "PREFIX_TUNING": "model", "PROMPT_TUNING": "model"}
_ORDER = ("layer", "site", "model")
GATED = ("LORA", "BOTTLENECK", "PREFIX_TUNING")  # the methods with a UniPELT gate


class ConfigUnion:
    """Several method configs applied together: `peftkern.patch(model, ConfigUnion(lora, adapter))`.
    Components: peftkern configs, `peft` config objects, AdapterHub bottleneck configs or dicts
    (anything `peftkern.patch` takes), of LoRA, IA³, bottleneck adapters, prefix or prompt
    tuning; a ConfigUnion among them is flattened into this one. `use_gating=True` gates every
    component (UniPELT's gates, as AdapterHub's use_gating on each). `prefix_convention=
    "adapterhub"` numbers the real tokens from 0 and sizes a projected prefix's embedding by the
    hidden size, as AdapterHub's prefix tuning does ("peft", the default: PEFT's; methods/prefix.py)."""

    peft_type = "UNION"

    def __init__(self, *configs, use_gating: bool = False, prefix_convention: str = "peft"):
        self.configs = list(configs)
        self.use_gating = use_gating
        self.prefix_convention = prefix_convention

    @classmethod
    def from_any(cls, config) -> "ConfigUnion":
        """A fresh union of resolved, validated component configs, from a ConfigUnion or a dict
        {"peft_type": "UNION", "configs": [...]}."""
        if isinstance(config, ConfigUnion):
            parts, use_gating, convention = config.configs, config.use_gating, config.prefix_convention
        elif isinstance(config, dict) and isinstance(config.get("configs"), (list, tuple)):
            parts, use_gating = config["configs"], config.get("use_gating", False)
            convention = config.get("prefix_convention", "peft")
        else:
            raise TypeError(f"expected a ConfigUnion or a dict with 'configs', got {type(config).__name__}")
        if not isinstance(use_gating, bool):
            raise TypeError(f"ConfigUnion use_gating must be True or False, got {use_gating!r}")
        if convention not in ("peft", "adapterhub"):
            raise ValueError(f"ConfigUnion prefix_convention must be 'peft' or 'adapterhub', got {convention!r}")
        resolved = []
        for index, part in enumerate(parts):
            if isinstance(part, ConfigUnion):
                inner = cls.from_any(part)
                if (inner.use_gating, inner.prefix_convention) != (use_gating, convention):
                    raise ValueError("ConfigUnion: a gated union inside an ungated one (or the reverse), or another prefix "
                                     "convention; set use_gating / prefix_convention on the outer one")
                resolved += inner.configs
                continue
            if not (isinstance(part, dict) or hasattr(part, "peft_type") or hasattr(part, "to_dict")):
                raise TypeError(f"ConfigUnion component {index} is a {type(part).__name__} ({part!r}), not a method config")
            _, component = resolve_config(part)
            if use_gating and component.peft_type == "BOTTLENECK":  # its own config says so: its folder loads alone
                component = dataclasses.replace(component, use_gating=True)
            resolved.append(component)
        return ConfigUnion(*resolved, use_gating=use_gating, prefix_convention=convention)

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
            if self.prefix_convention != "peft" and config.peft_type == "PROMPT_TUNING":
                raise ValueError(f"ConfigUnion component {index} is PROMPT_TUNING: prefix_convention applies to prefix tuning")
            if self.use_gating and config.peft_type not in GATED:
                raise NotImplementedError(f"ConfigUnion component {index} is {config.peft_type}, which has no UniPELT gate; "
                                          f"a gated union takes {list(GATED)}")  # fmt: skip

    def to_dict(self) -> dict:
        """{"peft_type": "UNION", "configs": [each component's fields, with its peft_type]}: the
        dict form `from_any` (and so `peftkern.patch`) takes back."""
        return {"peft_type": self.peft_type, "use_gating": self.use_gating, "prefix_convention": self.prefix_convention,
                "configs": [{**dataclasses.asdict(c), "peft_type": c.peft_type} for c in self.configs]}  # fmt: skip

    def __repr__(self) -> str:
        options = (", use_gating=True" if self.use_gating else "") + (
            f", prefix_convention={self.prefix_convention!r}" if self.prefix_convention != "peft" else "")
        return f"{type(self).__name__}({', '.join(type(c).__name__ for c in self.configs)}{options})"


class MAMConfig(ConfigUnion):
    """The mix-and-match adapter (He et al., ICLR 2022) with AdapterHub's `MAMConfig` defaults:
    prefix tuning (30 virtual tokens, the MLP reparametrisation with 800 hidden units and tanh)
    plus a parallel adapter on the FFN (`ParBnConfig()`: reduction_factor=2, scaling=4.0,
    "mam_adapter" init). Either part may be given instead. The prefix follows PEFT's conventions
    unless prefix_convention="adapterhub" (positions from 0, a [P, hidden] embedding under
    grouped-query attention: AdapterHub's MAM; docs/hybrids.md)."""

    def __init__(self, prefix_tuning=None, adapter=None, prefix_convention: str = "peft"):
        if prefix_tuning is None:
            prefix_tuning = PrefixTuningConfig(num_virtual_tokens=30, prefix_projection=True, encoder_hidden_size=800)
        super().__init__(prefix_tuning, adapter if adapter is not None else ParBnConfig(),
                         prefix_convention=prefix_convention)  # fmt: skip



class UniPELTConfig(ConfigUnion):
    """UniPELT (Mao et al., ACL 2022) with AdapterHub's `UniPELTConfig` defaults, every component
    gated: prefix tuning (10 virtual tokens through AdapterHub's MLP: 512 hidden units, tanh), a
    sequential bottleneck adapter after the FFN (`SeqBnConfig(reduction_factor=16)`, AdapterHub's
    "bert" init) and LoRA (r=8 on the attention's query and value; AdapterHub's alpha=2 is kept
    but unused: a gated LoRA drops α/r). Any part may be given instead; it is gated too.
    prefix_convention as for MAMConfig."""

    def __init__(self, prefix_tuning=None, adapter=None, lora=None, prefix_convention: str = "peft"):
        if prefix_tuning is None:
            prefix_tuning = PrefixTuningConfig(num_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=512)
        if adapter is None:
            adapter = SeqBnConfig(reduction_factor=16, init_weights="bert")
        if lora is None:
            lora = LoraConfig(r=8, lora_alpha=2, target_modules=["q_proj", "v_proj"])
        super().__init__(prefix_tuning, adapter, lora, use_gating=True, prefix_convention=prefix_convention)


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
        extra = dict(options) if kind == "layer" else {}
        if config.use_gating:
            extra["use_gating"] = True
        if config.prefix_convention != "peft" and component.peft_type == "PREFIX_TUNING":
            extra["convention"] = config.prefix_convention
        plan = method_module(component.peft_type).plan_patch(model, component, name, **extra)
        planned.append((folder, kind, plan))
    check_conflicts([(folder, kind, plan.modules) for folder, kind, plan in planned])
    ordered = sorted(planned, key=lambda p: _ORDER.index(p[1]))  # stable: the union's order within a kind

    def apply(record) -> None:
        for _, _, plan in ordered:
            plan(record)

    return apply


def gate_tensors(model, config: ConfigUnion, adapter_name: str) -> dict[str, dict]:
    """{folder: {AdapterHub-style name: live gate tensor}} of a gated union's LoRA and prefix
    components (their own formats, PEFT's, have no place for gates); a bottleneck adapter's gates
    are in its own checkpoint. Empty for an ungated union."""
    if not config.use_gating:
        return {}
    found = {}
    for folder, name, component in components(config, adapter_name):
        collect = getattr(method_module(component.peft_type), "gate_tensors", None)
        if collect is not None:
            found[folder] = collect(model, name)
    return found


def adapter_tensors(model, adapter_name: str):
    raise TypeError("a ConfigUnion has one checkpoint per component: peftkern.io.union_state_dicts(model, adapter_name)")
