"""What became of one task: extracted now, found stored, or failed with a reason (torch-free).

``Processor.run`` (``butd.workers.batcher``) returns one ``Outcome`` per task, in task order;
the online path answers from it (``butd.workers.replies``), the job path records it
(``butd.workers.handlers``). Each case is its own type, so a caller matches on the type
instead of reading a flag, and a failure always carries its reason:

* ``Extracted``: the model computed the record now (answered before it is sealed);
* ``Cached``: the store already held (model_version, content_sha256): nothing computed;
* ``Failed``: unreadable, undecodable, refused by the model or by the store; ``reason`` says
  why, in the words the caller reports to the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from butd.store.records import FeatureRecord

if TYPE_CHECKING:
    from butd.workers.batcher import Task


@dataclass(frozen=True)
class Extracted:
    """Computed now.

    Attributes:
        task: the task it answers.
        content_sha256: sha256 hex of the image bytes (the store's content key).
        model_version: the version it was computed under (the request's options included).
        record: the record, named ``task.image_id``, features in the model's dtype.
    """

    task: Task
    content_sha256: str
    model_version: str
    record: FeatureRecord


@dataclass(frozen=True)
class Cached:
    """Already stored under (``model_version``, ``content_sha256``); nothing was computed."""

    task: Task
    content_sha256: str
    model_version: str


@dataclass(frozen=True)
class Failed:
    """Not computed, or computed but not storable.

    Attributes:
        task: the task it answers.
        reason: why, for the user (the online error, the job's item error).
        content_sha256: the content key when the bytes were read ("" when they were not).
    """

    task: Task
    reason: str
    content_sha256: str = ""


Outcome = Extracted | Cached | Failed
