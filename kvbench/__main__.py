"""``python -m kvbench`` (or ``kvbench``): the Hydra app. See ``kvbench/conf/config.yaml`` for the default sweep."""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kvbench.config import register_schema
from kvbench.errors import ConfigError
from kvbench.runner import run

log = logging.getLogger("kvbench")
register_schema()


# configs ship inside the package, so an installed kvbench finds them (pkg://kvbench/conf)
@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> list[dict]:
    try:
        return run(OmegaConf.to_object(cfg))  # a KVBenchConfig, interpolations resolved
    except ConfigError as e:
        overrides = " ".join(HydraConfig.get().overrides.task)
        print(f"kvbench: configuration error ({overrides}): {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside the sample loop (while loading); inside it the runner stops
        print("kvbench: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
