"""Reference points (Msvm_VirtualSystemReferencePointService and ConvertToReferencePoint): what a
recovery checkpoint leaves behind once its backup is done, the RCT IDs its disks were at."""

from __future__ import annotations

from hvbackup.errors import HostError
from hvbackup.host import checkpoints
from hvbackup.host.fileerrors import file_errors
from hvbackup.host.model import CONSISTENCY_APPLICATION, CONSISTENCY_CRASH, ReferencePoint, new_id
from hvbackup.host.returns import INVALID_PARAMETER
from hvbackup.host.vm import Vm


def convert_to_reference_point(vm: Vm, checkpoint_id: str, *, element_name: str | None = None,
                               consistency_level: int | None = None) -> ReferencePoint:
    """The recovery checkpoint becomes a reference point; the checkpoint itself is destroyed, its
    AVHDX merged back. Both happen under one document save, then the merge follows. The point's
    ElementName and ConsistencyLevel are the checkpoint's unless given (ReferencePointSettings)."""
    if element_name is not None and not isinstance(element_name, str):
        raise HostError(f"a reference point's name is text, not {element_name!r}", INVALID_PARAMETER)
    if consistency_level is not None and consistency_level not in (CONSISTENCY_APPLICATION, CONSISTENCY_CRASH):
        raise HostError(f"ConsistencyLevel {consistency_level!r} is not 1 (application) or 2 (crash)",
                        INVALID_PARAMETER)
    with vm.host.lock.held(), file_errors(f"VM {vm.vm_id}: converting a checkpoint to a reference point"):
        checkpoints.finish_intent(vm)
        checkpoint = vm.checkpoint(checkpoint_id)
        checkpoints.require_recovery(checkpoint)
        point = ReferencePoint(
            instance_id=new_id(),
            virtual_system_identifier=vm.vm_id,
            virtual_disk_identifiers=[d.instance_id for d in checkpoint.disks],
            resilient_change_tracking_identifiers=[d.rct_id for d in checkpoint.disks],
            consistency_level=consistency_level or checkpoint.consistency_level,
            created=checkpoint.created,
            exported=list(checkpoint.exported),
            element_name=checkpoint.name if element_name is None else element_name,
        )
        document = vm.load()
        checkpoints.drop_record(document, checkpoint)
        document["reference_points"].append(point.to_dict())
        document["intent"] = {"op": "collapse"}
        vm.save(document)
        checkpoints.collapse(vm)
        return point


def destroy_reference_point(vm: Vm, instance_id: str) -> None:
    with vm.host.lock.held():
        point = vm.reference_point(instance_id)
        document = vm.load()
        document["reference_points"] = [r for r in document["reference_points"]
                                         if r["instance_id"] != point.instance_id]
        vm.save(document)
