"""Runnable extension examples for mulan (see docs/extending.md). Each module has a ``main()``."""
