"""Transforms: one module per family, each registered in :mod:`growcli.transforms.registry`;
:mod:`growcli.transforms.catalog` imports them all and looks them up by name."""
