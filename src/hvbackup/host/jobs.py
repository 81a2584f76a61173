"""Msvm_ConcreteJob: a long host operation running in a thread, observed the way WMI clients poll it.

A job goes New (2) -> Starting (3) -> Running (4) and ends Completed (7), Terminated (8, it was
asked to stop and did) or Exception (10, it failed: ``error_code`` holds the method's WMI return
value for the failure, ``error_description`` the message). Completed with warnings (32768) counts as
success too, as Microsoft's samples treat it.

Stopping is cooperative, as Msvm_ConcreteJob.RequestStateChange(Terminate) is on Hyper-V: the
operation is handed a ``cancelled()`` check and decides where it can stop cleanly. While the request
is pending the job is Shutting Down (6); an operation that never looks finishes Completed. An
interruption raised in the job's thread (KeyboardInterrupt, SystemExit) ends it Terminated too.
"""

from __future__ import annotations

import datetime
import enum
import threading
from typing import Any, Callable

from hvbackup.errors import HostError, HvBackupError
from hvbackup.host.model import new_id
from hvbackup.host.returns import FAILED


class JobState(enum.IntEnum):
    """CIM_ConcreteJob.JobState."""

    NEW = 2
    STARTING = 3
    RUNNING = 4
    SUSPENDED = 5
    SHUTTING_DOWN = 6
    COMPLETED = 7
    TERMINATED = 8
    KILLED = 9
    EXCEPTION = 10
    SERVICE = 11
    COMPLETED_WITH_WARNINGS = 32768


SUCCEEDED = frozenset({JobState.COMPLETED, JobState.COMPLETED_WITH_WARNINGS})
FINISHED = SUCCEEDED | {JobState.TERMINATED, JobState.KILLED, JobState.EXCEPTION}


class JobType(enum.IntEnum):
    """Msvm_ConcreteJob.JobType values of the operations this host runs as jobs."""

    MERGING_VHD_DISKS = 50
    IMPORT_VIRTUAL_MACHINE = 61
    EXPORT_VIRTUAL_MACHINE = 62
    SNAPSHOT_VIRTUAL_MACHINE = 70
    APPLY_VIRTUAL_MACHINE_SNAPSHOT = 71
    DELETE_VIRTUAL_MACHINE_SNAPSHOT = 72
    REALIZING_VIRTUAL_MACHINE = 141
    CONVERT_SNAPSHOT_TO_REFERENCE_POINT = 200


class RequestedJobState(enum.IntEnum):
    """CIM_ConcreteJob.RequestStateChange RequestedState."""

    START = 2
    SUSPEND = 3
    TERMINATE = 4
    KILL = 5
    SERVICE = 6


# CIM_ConcreteJob.RequestStateChange return values
REQUEST_COMPLETED, REQUEST_NOT_SUPPORTED, REQUEST_INVALID_PARAMETER = 0, 1, 5
REQUEST_TRANSITION_STARTED, REQUEST_INVALID_STATE_TRANSITION = 4096, 4097

Operation = Callable[[Callable[[int, int], None], Callable[[], bool]], Any]


class ConcreteJob:
    """One asynchronous operation. ``result`` is the element it produced (Hyper-V finds it through
    Msvm_AffectedJobElement): a checkpoint, a reference point, a planned or realized VM, an export."""

    def __init__(self, job_type: int, description: str = "", *, cancellable: bool = True):
        self.instance_id = new_id()
        self.job_type = int(job_type)
        self.description = description
        self.cancellable = cancellable
        self.job_state = JobState.NEW
        self.percent_complete = 0
        self.error_code = 0
        self.error_description = ""
        self.start_time: str | None = None
        self.elapsed_seconds = 0.0
        self.result: Any = None
        self.exception: BaseException | None = None  # what ended it with Exception, for callers that want more
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # -- running -----------------------------------------------------------------------------------

    def run(self, operation: Operation) -> ConcreteJob:
        """Start ``operation(progress, cancelled)`` in a thread; ``progress(done, total)`` moves
        ``percent_complete``, ``cancelled()`` says whether a stop was requested. Returns the job."""
        if self._thread is not None:
            raise HostError(f"job {self.instance_id} was already started")
        if self.job_state == JobState.NEW:
            self.job_state = JobState.STARTING
        self.start_time = _now()
        self._thread = threading.Thread(target=self._body, args=(operation,), name=f"job-{self.job_type}",
                                        daemon=True)
        self._thread.start()
        return self

    def _body(self, operation: Operation) -> None:
        started = datetime.datetime.now(datetime.timezone.utc)
        with self._lock:
            if self.job_state == JobState.STARTING:
                self.job_state = JobState.RUNNING
        try:
            result = operation(self._progress, self._stop.is_set)
        except HvBackupError as exc:
            self._finish_failed(exc, getattr(exc, "return_value", FAILED))
        except Exception as exc:  # a defect: the job reports it rather than dying silently in its thread
            self._finish_failed(exc, FAILED, prefix=f"internal error ({type(exc).__name__}): ")
        except BaseException as exc:
            # KeyboardInterrupt or SystemExit raised in the job's thread: the operation cleaned up as
            # on a failure; the job ends Terminated. There is no caller in this thread to re-raise to.
            with self._lock:
                self.exception = exc
                self.error_code = FAILED
                self.error_description = f"interrupted ({type(exc).__name__})"
                self.job_state = JobState.TERMINATED
        else:
            with self._lock:
                self.result = result
                self.percent_complete = 100
                self.job_state = JobState.COMPLETED
        finally:
            self.elapsed_seconds = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
            self._done.set()

    def _finish_failed(self, exc: BaseException, code: int, prefix: str = "") -> None:
        with self._lock:
            self.exception = exc
            self.error_code = code
            self.error_description = prefix + str(exc)
            self.job_state = JobState.TERMINATED if self._stop.is_set() else JobState.EXCEPTION

    def _progress(self, done: int, total: int) -> None:
        if total > 0:
            self.percent_complete = max(0, min(99, done * 100 // total))

    # -- observing and controlling ------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.job_state in FINISHED

    @property
    def succeeded(self) -> bool:
        return self.job_state in SUCCEEDED

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or ``timeout`` seconds passed (False)."""
        return self._done.wait(timeout)

    def request_state_change(self, requested_state: int) -> int:
        """Msvm_ConcreteJob.RequestStateChange: Terminate (4) or Kill (5) asks the operation to stop
        (4096: the transition started; the job ends Terminated once the operation stops). Returns
        1 for a state this host does not offer or a job that cannot be cancelled, 4097 for a job
        already finished, 5 for a value that is not a RequestedState."""
        try:
            RequestedJobState(requested_state)
        except ValueError:
            return REQUEST_INVALID_PARAMETER
        if requested_state not in (RequestedJobState.TERMINATE, RequestedJobState.KILL) or not self.cancellable:
            return REQUEST_NOT_SUPPORTED
        with self._lock:
            if self.finished:
                return REQUEST_INVALID_STATE_TRANSITION
            self._stop.set()
            self.job_state = JobState.SHUTTING_DOWN
        return REQUEST_TRANSITION_STARTED

    def cancel(self) -> int:
        return self.request_state_change(RequestedJobState.TERMINATE)

    def to_dict(self) -> dict:
        return {
            "instance_id": self.instance_id, "job_type": self.job_type, "description": self.description,
            "job_state": int(self.job_state), "job_state_name": self.job_state.name.title().replace("_", ""),
            "percent_complete": self.percent_complete, "error_code": self.error_code,
            "error_description": self.error_description, "cancellable": self.cancellable,
            "start_time": self.start_time, "elapsed_seconds": round(self.elapsed_seconds, 3),
        }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
