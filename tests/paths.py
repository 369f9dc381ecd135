from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"

# The RL job's toy: the tiny model with random weights on the bundled sample tasks, a rollout
# server, the released protocol and the megatron-core trainer. The embedded default (conf/rl.yaml)
# starts from the tiny model's cold start, minutes of SFT to build; tests of the job's machinery
# put these first in their overrides.
TOY_RL = ("model=tiny", "data=sample", "rollout=hf", "trainer=megatron", "protocol.variant=deepeyesv2", "optim.lr=1e-5",
          "grpo.prompts_per_step=4", "grpo.steps=3", "grpo.micro_batch_size=2")
