"""butd: bottom-up region features (Faster R-CNN R101 + attributes, Anderson et al. 2018).

One import name; the layers live in the repository's top-level folders (docs/architecture.md):

    butd.client     Client of the HTTP API (httpx, no torch)         butd/client.py
    butd.cli        the ``butd`` command: the composition root        butd/cli/
    butd.service    the gateway (FastAPI, no torch)                   service/
    butd.workers    the queue and the worker loop                     workers/
    butd.store      feature files, shards, index, exports (no torch)  store/
    butd.detector   the detector (torch): ``butd.detector.Extractor``  detector/
    butd.heads      caption and VQA heads (torch)                     heads/
"""

from pathlib import Path as _Path

# Run from a source checkout (PYTHONPATH=checkout, or the checkout as working directory) the
# layers are found next to this folder, so ``butd.service`` is that checkout's ``service/``
# rather than whatever an editable install elsewhere maps it to. An installed wheel has them
# inside ``butd/`` and skips this.
_CHECKOUT = _Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "service" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))
