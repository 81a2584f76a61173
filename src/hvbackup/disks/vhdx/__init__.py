"""VHDX, per [MS-VHDX]: one module per structure, ``disk.VhdxDisk`` for an open file and
``create.create_vhdx`` for new ones."""
