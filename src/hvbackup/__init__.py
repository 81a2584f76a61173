"""hvbackup: host-side virtual machine backup in the manner of Hyper-V."""

__version__ = "0.1.0"
