"""``python -m dnsconvert`` (what ``torchrun -m dnsconvert`` runs)."""

from .cli import main

main()
