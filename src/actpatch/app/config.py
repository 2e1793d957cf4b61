"""Declarative experiments: a YAML (or dict) validated by pydantic. Unknown keys and wrong types
are errors that name the field.

Example (``examples/ioi.yaml``)::

    model: smollm2-135m
    prompts: {builder: ioi, n: 16, templates: [0, 2, 6]}
    corruption: {name: str}
    targets:
      - {target: resid_pre}
      - {target: z}
    directions: [denoise, noise]
    metrics: [logit_diff, prob]
    paths: [{receivers: [resid_final]}]                          # optional: path patching
    circuits: {methods: [eap, eap-ig], sizes: [10, 100, 1000]}   # optional: edges, faithfulness
    dictionaries: {sources: [bundled]}                           # optional: a sparse feature circuit
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..corruption import CorruptionKind
from ..errors import ConfigError, SiteError
from ..metrics import DIFFERENTIABLE, Metric
from ..sites import Site, SiteKind
from ..techniques.eap import EdgeMethod
from ..techniques.graph import GraphLayout
from ..types import Direction, Engine, Method

__all__ = ["ExperimentConfig", "PathConfig", "CircuitsConfig", "SubspaceConfig", "SubspaceMethod", "DASConfig",
           "PatchscopeConfig", "InterchangeConfig", "GenerationConfig", "DictionariesConfig", "ConfigError",
           "load_config"]


class SubspaceMethod(str, enum.Enum):
    """Where a subspace target's basis comes from."""

    DIFF_OF_MEANS = "diff_of_means"
    PROBE = "probe"
    PCA = "pca"
    FILE = "file"


def _check_sites(texts: list[str]) -> None:
    """Site strings as :meth:`Site.parse` reads them; its message becomes the field's error."""
    for text in texts:
        try:
            Site.parse(text)
        except SiteError as e:
            raise ValueError(str(e)) from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MAX_PROMPTS = 100_000
"""The most prompts a config may ask for (a bound on what a run costs, checked before loading)."""


class PromptsConfig(_Strict):
    """Either a builder with its arguments, or a file of prompt pairs (JSONL or CSV with
    columns clean, corrupted, answer, alternative)."""

    builder: Literal["ioi", "factual", "greater_than", "induction"] | None = None
    file: str | None = None
    n: int = Field(16, ge=1)
    seed: int = 0
    args: dict[str, Any] = Field(default_factory=dict)
    """Extra builder arguments, e.g. {templates: [0, 2], corruption: abc} for ioi."""
    templates: list[int] | None = None
    keep_correct: bool = True
    """Drop prompts the model gets wrong before patching (the share is reported)."""

    @field_validator("file")
    @classmethod
    def _file_or_builder(cls, v: str | None, info: Any) -> str | None:
        if v is not None and info.data.get("builder") is not None:
            raise ValueError("give either 'builder' or 'file', not both")
        return v

    @model_validator(mode="after")
    def _bounded(self) -> "PromptsConfig":
        """Refuse, before the model loads, more prompts than the builder can make or than a run
        should hold."""
        from ..prompts.greater_than import greater_than_capacity
        from ..prompts.ioi import ioi_capacity

        templates = self.templates if self.templates is not None else self.args.get("templates")
        cap = (ioi_capacity(templates, str(self.args.get("order", "mixed"))) if self.builder == "ioi"
               else greater_than_capacity() if self.builder == "greater_than" else None)
        if cap is not None and self.n > cap:
            raise ValueError(f"n={self.n}: the {self.builder} builder makes at most {cap} distinct prompts"
                             + (f" with templates {list(templates)}" if templates is not None else "")
                             + f"; ask for at most {cap}")
        if self.n > MAX_PROMPTS:
            raise ValueError(f"n={self.n}: more than {MAX_PROMPTS} prompts; every patch runs on every prompt, so a "
                             f"sweep of this size would take days. Ask for fewer (a few hundred pin effects down to "
                             f"~0.05), or build larger sets in Python (ap.prompts.{self.builder or 'ioi'}(model, n=...))")
        return self


class CorruptionConfig(_Strict):
    name: CorruptionKind = CorruptionKind.STR
    scale: float = Field(3.0, ge=0)
    n_draws: int = Field(10, ge=1)
    positions: list[int] | None = None


class SubspaceConfig(_Strict):
    """Patch only a subspace of the target (docs/subspace.md): per layer, a basis found from the
    prompts at ``position`` (an index or a name such as ``end`` / ``S2``), or read from a file."""

    method: SubspaceMethod = SubspaceMethod.DIFF_OF_MEANS
    position: int | str = "end"
    """Where the directions are read (one position per prompt)."""
    k: int = Field(1, ge=1)
    """Directions per layer (pca only)."""
    file: str | None = None
    """safetensors with ``basis`` (k, d), shared by every layer, or ``layer_<l>`` per layer."""
    check: bool = True
    """Run the interpretability-illusion check on the strongest cell."""

    @model_validator(mode="after")
    def _consistent(self) -> "SubspaceConfig":
        if (self.method is SubspaceMethod.FILE) != (self.file is not None):
            raise ValueError("method: file needs file: <path.safetensors>, and file: needs method: file")
        if self.k > 1 and self.method is not SubspaceMethod.PCA:
            raise ValueError(f"k={self.k}: only method pca finds several directions (diff_of_means and probe find one)")
        return self


class DASConfig(_Strict):
    """A DAS job: learn a k-dim subspace at one site (ap.subspaces.das); writes das_<name>.json and
    das_<name>.safetensors."""

    site: str
    """A vector site, e.g. resid_pre.L21, mlp_post.L20, z.L9.H1 (with .pos<i> or position:)."""
    position: int | str | None = None
    """A position index or name (end, S2, ...) that falls at the same index in every prompt."""
    k: int = Field(1, ge=1)
    steps: int = Field(100, ge=1)
    lr: float = Field(0.05, gt=0)
    test_fraction: float = Field(0.25, gt=0, lt=1)

    @field_validator("site")
    @classmethod
    def _site(cls, v: str) -> str:
        _check_sites([v])
        return v

    @property
    def name(self) -> str:
        """The job's file stem: only letters, digits and ``_ . + -`` (a position name can hold anything)."""
        where = f".{self.position}" if self.position is not None else ""
        return "das_" + self.site + re.sub(r"[^A-Za-z0-9_.+-]", "_", where).replace("..", "_") + f"_k{self.k}"


class TargetConfig(_Strict):
    target: SiteKind
    per_position: bool | None = None
    layers: list[int] | None = None
    positions: list[int] | list[str] | None = None
    """Indices, or position names ([IO, S1, S2, end]; see actpatch.techniques.positions) for prompts of any lengths."""
    heads: list[int] | None = None
    neurons: list[int] | None = None
    window: int = Field(1, ge=1)
    method: Method = Method.EXACT
    """exact: activation patching (ap.sweep); atp: attribution patching estimates (ap.attribute)."""

    @field_validator("method", mode="before")
    @classmethod
    def _sweep_method(cls, m: Any) -> Any:
        if m not in (Method.EXACT, Method.ATP, "exact", "atp"):
            raise PydanticCustomError("sweep_method", "Input should be 'exact' or 'atp', not {m!r} (path patching has its own "
                                      "section, paths:)", {"m": m})
        return m
    qk_fix: bool = False
    """atp only: AtP*'s exact softmax for q / k targets."""
    grad_drop: bool = False
    """atp only: AtP*'s GradDrop (magnitudes; components only)."""
    subspace: SubspaceConfig | None = None
    """Patch only a subspace of each site (exact patching only)."""

    @model_validator(mode="after")
    def _atp_options(self) -> "TargetConfig":
        if self.subspace is not None:
            if self.method is not Method.EXACT:
                raise ValueError("subspace: applies to exact patching (method: exact)")
            if self.target is SiteKind.PATTERN:
                raise ValueError("subspace: a pattern's last axis is key positions, not a vector space")
            if self.subspace.method is not SubspaceMethod.FILE and self.target.has_heads:
                raise ValueError(f"subspace: {self.subspace.method.value} finds one direction per layer, but {self.target.value} "
                                 f"has one vector per head; give a basis file (method: file)")
        if self.method is not Method.ATP and (self.qk_fix or self.grad_drop):
            raise ValueError("qk_fix and grad_drop refine attribution patching: set method: atp")
        if self.qk_fix and self.target not in (SiteKind.Q, SiteKind.K):
            raise ValueError(f"qk_fix applies to q and k targets, not {self.target.value!r}")
        return self

    @property
    def name(self) -> str:
        suffix = ""
        if self.method is Method.ATP:
            suffix = "_atp" + ("_qk" if self.qk_fix else "") + ("_gd" if self.grad_drop else "")
        if self.subspace is not None:
            suffix += f"_sub_{self.subspace.method.value}" + (f"{self.subspace.k}" if self.subspace.k > 1 else "")
        return self.target.value + (f"_w{self.window}" if self.window > 1 else "") + suffix


class PathConfig(_Strict):
    """Path patching (Wang et al. 2022): every sender head (or MLP) into a set of receivers,
    written as sites: ``resid_final`` (the logits), ``q.L23.H3``, ``k.L23.KV1``, ``v.L20.KV0`` (keys and values by KV head)."""

    receivers: list[str] = Field(min_length=1)
    sender: Literal["z", "mlp_out"] = "z"
    layers: list[int] | None = None
    heads: list[int] | None = None

    @field_validator("receivers")
    @classmethod
    def _sites(cls, v: list[str]) -> list[str]:
        _check_sites(v)
        return v

    @property
    def name(self) -> str:
        return f"path_{self.sender}_to_" + "+".join(self.receivers)


CircuitMethod = enum.Enum("CircuitMethod", {**{m.name: m.value for m in EdgeMethod}, "MASK": "mask"}, type=str)  # type: ignore[misc]
"""A config's circuits method: an edge-scoring method (:class:`~actpatch.techniques.eap.EdgeMethod`)
or a learned edge mask (``mask``)."""


class CircuitsConfig(_Strict):
    """Edge attribution and the faithfulness of the top-n-edge circuits (noising, the run's
    corruption and first metric)."""

    methods: list[CircuitMethod] = Field(default_factory=lambda: [CircuitMethod.EAP, CircuitMethod.EAP_IG],
                                         min_length=1)
    """eap-ig interpolates the input embeddings, eap-ig-act every node's output; mask learns an
    edge mask (``mask_steps`` steps towards ``mask_density`` of the edges, checkpointed in the
    output directory, so a killed run resumes)."""
    mask_steps: int = Field(200, ge=1)
    """Training steps of a learned mask."""
    mask_density: float = Field(0.05, gt=0, le=1)
    """The share of edges a learned mask keeps."""
    ig_steps: int = Field(5, ge=1)
    """Interpolation steps of EAP-IG."""
    sizes: list[int] = Field(default_factory=lambda: [10, 100, 1000, 10000], min_length=1)
    """Circuit sizes (numbers of edges) of the faithfulness curve."""
    evaluate: Literal["curve", "mib"] = "curve"
    """mib: also CPR / CMD at MIB's edge fractions for each method and a random baseline (mib.json)."""
    fractions: list[float] | None = None
    """Edge fractions of the MIB evaluation (default MIB's 0.1 % ... 100 %)."""
    selection: Literal["topn", "greedy"] = "topn"
    """How the MIB evaluation picks a circuit's edges: the best-scoring anywhere, or grown from the logits."""
    oracle_k: int | None = Field(None, ge=1)
    """With evaluate: mib, also the exact oracle: the first method's top ``oracle_k`` edges scored
    by cutting each one exactly (one circuit run per edge), evaluated like the methods."""
    direct_vs_total: bool = False
    """Also every head's and MLP's direct vs total effect, with self-repair findings (direct_total.json)."""
    layout: GraphLayout = GraphLayout.MIB
    """The graph: key / value inputs per query head as MIB counts them (mib), or per KV head (kv);
    they differ under grouped-query attention only."""

    @field_validator("sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(n < 0 for n in v):
            raise ValueError(f"circuit sizes must be >= 0, got {v}")
        return v


_NAME = r"^[A-Za-z0-9_.+-]+$"


class PatchscopeConfig(_Strict):
    """A Patchscope (ap.patchscope): what each layer's activation at the source positions says,
    decoded through a target prompt (the identity prompt by default; ``target_prompt: null``:
    the logit lens). Writes ``patchscope_<name>.json``."""

    name: str = Field(pattern=_NAME)
    sources: list[str] | None = Field(None, min_length=1)
    """Source texts (default: the run's first four clean prompts)."""
    site: Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"] = "resid_post"
    layers: list[int] | None = None
    positions: list[int] = Field(default_factory=lambda: [-1], min_length=1)
    """Source token indices (negative from each prompt's end)."""
    target_prompt: str | None = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
    target_position: int = -1
    target_layer: int | None = Field(None, ge=0)
    max_new_tokens: int = Field(4, ge=1)


def _check_write(text: str) -> None:
    if "->" not in text:
        raise ValueError(f"{text!r}: write 'source site -> base site', e.g. 'resid_pre.L10.posend -> resid_pre.L10.pos-1'")
    _check_sites([part.strip() for part in text.split("->", 1)])


class InterchangeConfig(_Strict):
    """A cross-prompt interchange (ap.interchange): activations of ``source`` prompts written into
    the run's prompts. Each patch is ``"source site -> base site"`` (several joined by ``" + "``
    are written together). Writes ``interchange_<name>.json``."""

    name: str = Field(pattern=_NAME)
    source: PromptsConfig | None = None
    """The prompts read (their clean prompts; default: the run's prompts, e.g. one position into another)."""
    patches: list[str] = Field(min_length=1)
    reduce: Literal["pair", "mean"] = "pair"
    """pair: source prompt i into prompt i (or one source into all); mean: the source set's mean (function vectors)."""

    @field_validator("patches")
    @classmethod
    def _writes(cls, v: list[str]) -> list[str]:
        for patch in v:
            for write in patch.split(" + "):
                _check_write(write)
        return v


class GenerationConfig(_Strict):
    """Patched generation (ap.generate) next to the unpatched one: ``patches`` at the prompt's
    positions and ``every_step`` at each new one, site -> value (0.0: zero ablation). Writes
    ``generation_<name>.json``."""

    name: str = Field(pattern=_NAME)
    prompt: str
    patches: dict[str, float] = Field(default_factory=dict)
    every_step: dict[str, float] = Field(default_factory=dict)
    max_new_tokens: int = Field(20, ge=1)

    @field_validator("patches", "every_step")
    @classmethod
    def _sites(cls, v: dict[str, float]) -> dict[str, float]:
        _check_sites(list(v))
        return v


class DictionariesConfig(_Strict):
    """Feature dictionaries (SAEs) attached for a feature-circuit job (ap.features.feature_circuit):
    node scores by AtP over every feature and error term, checked against exact feature
    patching, faithfulness / completeness curves, edges, and where the top features are most
    active. Writes ``features_circuit.json``."""

    sources: list[str] = Field(default_factory=lambda: ["bundled"], min_length=1)
    """Folders in SAELens's layout, ``bundled:<site>`` (trained for the model on first use) or
    ``bundled`` (the default sites)."""
    sizes: list[int] = Field(default_factory=lambda: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], min_length=1)
    """Node counts of the curves."""
    validate_k: int = Field(10, ge=0)
    """Exact feature patches checking the node scores: the k largest, their neighbours, k more."""
    examples: int = Field(3, ge=1)
    """Most-active prompts and tokens listed per top feature."""

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError(f"feature circuit sizes are node counts >= 1, got {v}")
        return v


class ExperimentConfig(_Strict):
    """One experiment: a model, prompts, a corruption, targets x directions, metrics."""

    model: str = "smollm2-135m"
    prompts: PromptsConfig = PromptsConfig(builder="ioi")
    corruption: CorruptionConfig = CorruptionConfig()
    targets: list[TargetConfig] = Field(default_factory=lambda: [TargetConfig(target="resid_pre")])
    directions: list[Direction] = Field(default_factory=lambda: [Direction.DENOISE, Direction.NOISE], min_length=1)
    metrics: list[Metric] = Field(default_factory=lambda: [Metric.LOGIT_DIFF, Metric.PROB], min_length=1)
    paths: list[PathConfig] = Field(default_factory=list)
    """Path patching sweeps, one result per entry and direction."""
    circuits: CircuitsConfig | None = None
    """Also find circuits: edge scores (EAP / EAP-IG) and faithfulness curves."""
    das: list[DASConfig] = Field(default_factory=list)
    """DAS jobs: subspaces learned at sites (see docs/subspace.md)."""
    patchscopes: list[PatchscopeConfig] = Field(default_factory=list)
    interchanges: list[InterchangeConfig] = Field(default_factory=list)
    generations: list[GenerationConfig] = Field(default_factory=list)
    dictionaries: DictionariesConfig | None = None
    """Attach feature dictionaries and find a sparse feature circuit (features_circuit.json)."""
    seed: int = 0
    engine: Engine = Engine.AUTO
    unit_size: int = Field(64, ge=1)
    """Patches per saved unit of progress (a killed run resumes from the last saved unit)."""
    chunk_size: int | None = Field(None, ge=1)
    """Patches per batched forward pass; fixed so that a resumed run repeats the same arithmetic."""
    memory_budget: int | str | None = None
    """Bytes (or "4GiB") for the activations of every technique (sweeps' captures, AtP targets,
    edge attribution, MIB scores, faithfulness); default: a share of the free memory. Give it
    for long prompts: a sweep resumes its saved units only under the same chunks of prompts."""

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v: int | str | None) -> int | str | None:
        if v is not None:
            from ..memory import parse_budget

            try:
                parse_budget(v)
            except Exception as e:  # the budget's own message names the fix
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _atp_metrics(self) -> "ExperimentConfig":
        if not (self.targets or self.paths or self.circuits or self.das or self.patchscopes or self.interchanges
                or self.generations or self.dictionaries):
            raise ValueError("nothing to run: give targets, paths, circuits, das, patchscopes, interchanges, "
                             "generations or dictionaries")
        for what in ("patchscopes", "interchanges", "generations"):
            names = [job.name for job in getattr(self, what)]
            if len(set(names)) != len(names):
                raise ValueError(f"{what}: every job needs its own name; {sorted(names)} repeats one")
        discrete = [m.value for m in self.metrics if m not in DIFFERENTIABLE]
        atp = [t.name for t in self.targets if t.method is Method.ATP]
        if atp and discrete:
            raise ValueError(f"targets {atp} use method atp, which needs differentiable metrics; "
                             f"remove {discrete} from metrics or run those targets with method: exact")
        if self.circuits is not None and self.metrics[0] not in DIFFERENTIABLE:
            raise ValueError(f"circuits score edges with the first metric, {self.metrics[0].value!r}, which is discrete; "
                             f"put a differentiable one (logit_diff) first")
        if self.dictionaries is not None and self.metrics[0] not in DIFFERENTIABLE:
            raise ValueError(f"a feature circuit scores nodes with the first metric, {self.metrics[0].value!r}, which "
                             f"is discrete; put a differentiable one (logit_diff) first")
        if self.circuits is not None and self.corruption.name not in (CorruptionKind.STR, CorruptionKind.RESAMPLE):
            raise ValueError(f"circuits need a corrupted run per prompt (corruption str or resample), "
                             f"not {self.corruption.name.value!r}")
        return self

    def digest(self) -> str:
        """Hash of the canonical config: a changed config cannot resume another's run."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _format_validation(e: ValidationError, source: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see examples/*.yaml)"
        elif err["type"] == "enum":
            field = next((str(x) for x in reversed(err["loc"]) if isinstance(x, str)), "value")
            field = {"metrics": "metric", "directions": "direction", "name": "corruption"}.get(field, field)
            msg = f"unknown {field} {err['input']!r}; use one of {err['ctx']['expected']}"
            loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(parts)


def _located(pc: PromptsConfig, config: Path, key: str) -> PromptsConfig:
    """``pc`` with its prompt file's path made absolute (relative paths are read from the
    config's folder); a missing file is refused by its key."""
    if pc.file is None:
        return pc
    f = Path(pc.file)
    if not f.is_absolute():
        f = config.parent / f
    if not f.is_file():
        raise ConfigError(f"{config}: {key} {pc.file!r} does not exist (looked at {f}).")
    return pc.model_copy(update={"file": str(f)})


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML experiment config.

    Raises:
        ConfigError: missing file, malformed YAML, unknown keys or wrong types (one line,
            naming the field).
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {str(p)!r} does not exist.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings (model:, prompts:, ...), got {type(data).__name__}.")
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, str(p))) from None
    cfg = cfg.model_copy(update={"prompts": _located(cfg.prompts, p, "prompts.file")})
    jobs = [j.model_copy(update={"source": _located(j.source, p, f"interchanges[{i}].source.file")})
            if j.source is not None else j for i, j in enumerate(cfg.interchanges)]
    cfg = cfg.model_copy(update={"interchanges": jobs})
    if cfg.dictionaries is not None:
        cfg = cfg.model_copy(update={"dictionaries": _located_dictionaries(cfg.dictionaries, p)})
    return cfg


def _located_dictionaries(dc: DictionariesConfig, config: Path) -> DictionariesConfig:
    """Dictionary folders relative to the config file; a missing one is an error here."""
    found = []
    for i, src in enumerate(dc.sources):
        if src == "bundled" or src.startswith("bundled:"):
            found.append(src)
            continue
        f = Path(src).expanduser()
        if not f.is_absolute():
            f = config.parent / f
        if not f.is_dir():
            raise ConfigError(f"{config}: dictionaries.sources[{i}] {src!r} is not a folder (looked at {f}); give "
                              f"a folder in SAELens's layout (cfg.json + sae_weights.safetensors) or 'bundled'.")
        found.append(str(f))
    return dc.model_copy(update={"sources": found})
