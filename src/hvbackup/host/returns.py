"""The return values of the host's WMI-shaped methods, defined once (docs/host.md, *Jobs*).

Two tables are in use, as on Hyper-V. Msvm_VirtualSystemSnapshotService inherits the CIM table of
CIM_VirtualSystemSnapshotService (1 to 6); the other services use the Msvm vendor range (32768 up).
Every HostError carries a vendor value (``HostError.return_value``), as does a job's ``error_code``;
the snapshot service translates it with ``cim_value``.
"""

COMPLETED = 0
JOB_STARTED = 4096  # Method Parameters Checked - Job Started

# Msvm_* vendor return values
FAILED = 32768
ACCESS_DENIED = 32769
NOT_SUPPORTED = 32770
STATUS_UNKNOWN = 32771
TIMEOUT = 32772
INVALID_PARAMETER = 32773
SYSTEM_IN_USE = 32774
INVALID_STATE = 32775
INCORRECT_DATA_TYPE = 32776
SYSTEM_NOT_AVAILABLE = 32777
OUT_OF_MEMORY = 32778
FILE_NOT_FOUND = 32779  # GetVirtualDiskChanges
FILE_IN_USE = 32779     # ImportSystemDefinition's meaning of the same value

# CIM_VirtualSystemSnapshotService return values
CIM_NOT_SUPPORTED, CIM_FAILED, CIM_TIMEOUT, CIM_INVALID_PARAMETER, CIM_INVALID_STATE, CIM_INVALID_TYPE = range(1, 7)

_CIM_OF_VENDOR = {NOT_SUPPORTED: CIM_NOT_SUPPORTED, TIMEOUT: CIM_TIMEOUT, INVALID_PARAMETER: CIM_INVALID_PARAMETER,
                  INVALID_STATE: CIM_INVALID_STATE, INCORRECT_DATA_TYPE: CIM_INVALID_TYPE}


def cim_value(vendor: int) -> int:
    """The CIM table's value for a vendor one; anything without an equivalent is Failed (2)."""
    return _CIM_OF_VENDOR.get(vendor, CIM_FAILED)
