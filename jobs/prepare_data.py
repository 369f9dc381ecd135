"""Convert the DeepEyesV2 data releases (SFT sharegpt JSON, RL parquet, image-search cache) into
our record files. See conf/prepare_data.yaml for a full command line.

    python jobs/prepare_data.py prepare.rl='[search.parquet,reason.parquet]' prepare.out_dir=data/converted
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from deepeyes.config import register_configs, to_object

register_configs()


@hydra.main(config_path="../conf", config_name="prepare_data", version_base=None)
def main(cfg: DictConfig) -> None:
    from deepeyes.data.converters.prepare import prepare_data

    job = to_object(cfg)
    prepare_data(job.prepare, Path(job.prepare.out_dir or job.run.out_dir))


if __name__ == "__main__":
    main()
