"""Cold-start SFT of an agentic VLM on multi-turn tool-using trajectories (DeepEyesV2 recipe).

    python jobs/sft.py                                 # embedded default: tiny model, one CPU box
    python jobs/sft.py model=qwen2_5_vl_7b model.path=/models/Qwen2.5-VL-7B-Instruct
    python jobs/sft.py --cfg job                        # print the resolved config
"""

import hydra
from omegaconf import DictConfig

from deepeyes.config import register_configs, to_object

register_configs()


@hydra.main(config_path="../conf", config_name="sft", version_base=None)
def main(cfg: DictConfig) -> None:
    from deepeyes.train.sft import train_sft

    train_sft(to_object(cfg))


if __name__ == "__main__":
    main()
