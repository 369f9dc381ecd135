"""Cold-start SFT of an agentic VLM on multi-turn tool-using trajectories (DeepEyesV2 recipe).

    python jobs/sft.py                                 # embedded default: tiny model, one CPU box
    python jobs/sft.py +experiment=deepeyesv2_7b_sft model.path=/models/Qwen2.5-VL-7B-Instruct data.sft=<sft.jsonl>
                                                        # the paper's cold start on 8 GPU nodes (32B: deepeyesv2_32b_sft)
    python jobs/sft.py --cfg job                        # print the resolved config
    python jobs/sft.py cluster=slurm nodes=2            # submit to Slurm (submitit): one job, the launch plan on 2 nodes
    python jobs/sft.py cluster=slurm cluster.dry_run=true   # print the launch plan and sbatch script, submit nothing
"""

import hydra
from omegaconf import DictConfig

from deepeyes.config import register_configs

register_configs()


@hydra.main(config_path="../conf", config_name="sft", version_base=None)
def main(cfg: DictConfig) -> None:
    from deepeyes.launch import launch

    launch("sft", cfg)


if __name__ == "__main__":
    main()
