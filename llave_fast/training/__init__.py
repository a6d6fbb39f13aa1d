"""The LLaVE training loop as a package of small modules, one concern each (listed, bottom to top,
in :mod:`llave_fast.train`, the public entry, which re-exports their public names). Imports go one
way: a module imports only modules listed below it; none imports llave_fast.train, cli or ablate."""
