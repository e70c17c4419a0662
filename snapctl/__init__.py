"""snapctl: checkpoint and restore VMs on /dev/kvm with the dirty ring."""

__version__ = "0.1.0"
