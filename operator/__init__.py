"""difftrain's Kopf operator, imported as ``difftrain_operator`` (source folder ``operator/``).

``operator`` itself is a module of Python's standard library, so the package cannot use that name.
"""
