"""fvlm's configuration: the data files under this folder and the code that finds and checks them.

The ground floor of the project (``pipelines -> fvlm -> anatomy -> configs``): it imports none of the other
packages. The YAML and JSON files beside this module (``anatomy/``, ``model/``, ``train/``, ...) are package
data, found through :mod:`importlib.resources` in a source checkout and in an installed wheel alike;
``FVLM_CONFIG_DIR`` points fvlm at another folder of the same layout (:func:`configs.paths.config_dir`).

- :mod:`configs.paths`: where the files are, preset names, name-or-path resolution.
- :mod:`configs.checks`: :class:`~configs.checks.ConfigError`, YAML reading with ``extends:``, field checks.
- :mod:`configs.typed`: the one loader of typed dataclass trees (recipes, model and demo configs) and the
  typed ``--set a.b=c`` overrides.
"""
