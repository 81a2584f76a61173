"""Reference points (Msvm_VirtualSystemReferencePointService and ConvertToReferencePoint): what a
recovery checkpoint leaves behind once its backup is done, the RCT IDs its disks were at."""

from __future__ import annotations

from hvbackup.host import checkpoints
from hvbackup.host.model import ReferencePoint, new_id
from hvbackup.host.vm import Vm


def convert_to_reference_point(vm: Vm, checkpoint_id: str) -> ReferencePoint:
    """The recovery checkpoint becomes a reference point; the checkpoint itself is destroyed, its
    AVHDX merged back. Both happen under one document save, then the merge follows."""
    with vm.host.lock.held():
        checkpoint = vm.checkpoint(checkpoint_id)
        checkpoints.require_recovery(checkpoint)
        point = ReferencePoint(
            instance_id=new_id(),
            virtual_system_identifier=vm.vm_id,
            virtual_disk_identifiers=[d.instance_id for d in checkpoint.disks],
            resilient_change_tracking_identifiers=[d.rct_id for d in checkpoint.disks],
            consistency_level=checkpoint.consistency_level,
            created=checkpoint.created,
            exported=list(checkpoint.exported),
        )
        document = vm.load()
        checkpoints._drop_record(document, checkpoint)
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
