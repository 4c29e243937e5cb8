"""``python -m kvbench`` (or ``kvbench``): the Hydra app. See ``kvbench/conf/config.yaml`` for the default sweep.

Bad input (a :class:`~kvbench.errors.ConfigError`, data errors included) is reported as one line on
stderr with exit status 2 and no traceback; ``--debug`` (or ``HYDRA_FULL_ERROR=1``) raises it with
its traceback instead. Top-level values and ``results_dir`` are checked before Hydra composes the
config and creates its job folder; everything else before any model is loaded."""

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kvbench.config import check_overrides, register_schema
from kvbench.errors import ConfigError, DataError
from kvbench.results import SchemaError
from kvbench.runner import run

log = logging.getLogger("kvbench")
register_schema()


def _report(error: Exception, overrides: list[str]) -> None:
    """Print a user error and exit 2, unless tracebacks were asked for."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    kind = "data error" if isinstance(error, DataError) else "configuration error"
    print(f"kvbench: {kind} ({' '.join(overrides)}): {error}", file=sys.stderr, flush=True)
    sys.exit(2)


# configs ship inside the package, so an installed kvbench finds them (pkg://kvbench/conf)
@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> list[dict]:
    try:
        return run(OmegaConf.to_object(cfg))  # a KVBenchConfig, interpolations resolved
    except (ConfigError, SchemaError) as e:  # SchemaError: a results file this kvbench cannot read
        _report(e, HydraConfig.get().overrides.task)
    except KeyboardInterrupt:  # Ctrl-C outside the sample loop (while loading); inside it the runner stops
        print("kvbench: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def cli() -> None:
    """The command line: ``--debug`` taken out (it sets ``HYDRA_FULL_ERROR=1``), the overrides checked
    against the schema, then the Hydra app."""
    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
        os.environ["HYDRA_FULL_ERROR"] = "1"
    overrides = [arg for arg in sys.argv[1:] if "=" in arg and not arg.startswith("-")]
    try:
        check_overrides(overrides)
    except ConfigError as e:
        _report(e, overrides)
    main()


if __name__ == "__main__":
    cli()
