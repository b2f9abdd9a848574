"""One loaded model ready to generate: the model, its tokenizer and, with Medusa, the heads and the tree."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from tinygrad import Device

from .generate import Generator
from ..model.loader import LoadedModel, load_model
from .heads import MedusaHeads, load_heads_for
from .sampling import GenerationConfig
from .tree import PLAIN, MedusaTree, load_tree

log = logging.getLogger(__name__)
# verifying 8 tokens cost 2.4 plain steps on a 2-core CPU against 1.3-1.4 for 2-4 (bench, tinygrad 0.14): stay small
DEFAULT_CPU_TREE = "cpu-4"
DEFAULT_GPU_TREE = "mc_sim_7b_63"


@dataclass(frozen=True)
class MedusaOptions:
    enabled: bool = False
    heads: str | None = None          # path or HF repo; default: the model card's
    num_heads: int | None = None      # use only the first N heads
    num_layers: int | None = None
    choices: str | None = None        # preset name or JSON file; default: a tuned tree, else per device kind
    draft_head: str | None = None     # a feature-level draft head's directory (train-draft-head), in place of heads
    draft_depth: int = 3              # tokens it drafts a step


@dataclass
class Session:
    loaded: LoadedModel
    generator: Generator
    heads: MedusaHeads | None
    tree: MedusaTree

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def prompt_ids(self, prompt: str, chat_template: bool = True, system: str | None = None) -> list[int]:
        if not chat_template:
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.tokenizer.encode_chat(messages)

    def warm_up(self, prompt_ids: list[int], cfg: GenerationConfig, tokens: int = 8) -> None:
        """Compile kernels and capture the steps a generation of `cfg` on this prompt uses, untimed: TinyJit captures
        a step on its second call, hence two short generations with the same sampling settings."""
        short = replace(cfg, max_new_tokens=min(tokens, cfg.max_new_tokens))
        for _ in range(2):
            self.generator.generate(prompt_ids, short)
        if self.generator.uses_lookup(cfg):
            self.generator.capture_steps()  # draft chains of every size, which a short generation need not reach


def is_cpu_device(device: str) -> bool:
    """tinygrad device names of the host CPU ("CPU", "CPU:LLVM", older "CLANG"/"LLVM")."""
    return device.split(":")[0].lower() in ("cpu", "clang", "llvm")


def default_tree_spec(device: str, heads_dir: str | None) -> str:
    """A tree tuned for this device kind next to the heads (tune-tree writes it), else the preset for the kind."""
    kind = device.split(":")[0].lower()
    if heads_dir:
        from pathlib import Path
        tuned = Path(heads_dir) / f"tree-{kind}.json"
        if tuned.is_file():
            return str(tuned)
    return DEFAULT_CPU_TREE if is_cpu_device(device) else DEFAULT_GPU_TREE


def resolve_heads_path(loaded: LoadedModel, medusa: MedusaOptions) -> str:
    path = medusa.heads or (loaded.resolved.card.heads_path() if loaded.resolved.card else None)
    if path is None:
        raise ValueError(f"--medusa-enabled: model {loaded.resolved.model_id!r} has no default Medusa heads; "
                         f"pass --medusa-heads PATH|REPO (train some with `exo-medusa train-heads`)")
    return path


def default_datastore(loaded: LoadedModel):
    """The datastore shipped for the model (models/<card id>/datastore, built by `exo-medusa build-datastore`), or
    None when there is none."""
    from ..model.registry import MODELS_DIR
    from .datastore import META_FILE, Datastore
    card = loaded.resolved.card
    path = MODELS_DIR / card.id / "datastore" if card else None
    return Datastore.load(path) if path is not None and (path / META_FILE).is_file() else None


def open_session(model: str | None = None, *, device: str | None = None, dtype: str | None = None,
                 max_context: int | None = 2048, medusa: MedusaOptions = MedusaOptions(),
                 weights: str | None = None, activations: str = "float32") -> Session:
    loaded = load_model(model, device=device, dtype=dtype, max_context=max_context, weights=weights,
                        activations=activations)
    heads, tree, draft_head = None, PLAIN, None
    if medusa.enabled and medusa.draft_head:
        from .draft_head import DraftHead
        from .draft_steps import DraftHeadSteps
        draft_head = DraftHeadSteps(DraftHead.load(medusa.draft_head), loaded.model, medusa.draft_depth)
        log.info("Medusa: draft head %s, %d tokens a step", medusa.draft_head, medusa.draft_depth)
    elif medusa.enabled:
        heads_path = resolve_heads_path(loaded, medusa)
        heads = load_heads_for(heads_path, loaded.model).use_first(medusa.num_heads, medusa.num_layers)
        tree = load_tree(medusa.choices or default_tree_spec(loaded.device or Device.DEFAULT, heads_path))
        tree.check_heads(heads.num_heads)
        log.info("Medusa: %d heads, tree %s (%d nodes)", heads.num_heads, tree.name, tree.size)
    elif any(v is not None for v in (medusa.heads, medusa.num_heads, medusa.num_layers, medusa.choices)):
        raise ValueError("Medusa options were given without --medusa-enabled")
    generator = Generator(loaded.model, loaded.tokenizer.eos_token_ids, tree, heads, datastore=default_datastore(loaded),
                          tokenizer=loaded.tokenizer, draft_head=draft_head)
    return Session(loaded, generator, heads, tree)
