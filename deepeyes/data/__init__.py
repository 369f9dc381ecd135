"""Records: schema, validating readers and writers, and the synthetic sample dataset."""

from deepeyes.data.readers import read_records, read_sft_records
from deepeyes.data.sample_tasks import SampleDataset, ensure_sample_data, generate_sample_data
from deepeyes.data.schema import IMAGE_PLACEHOLDER, Message, Record, RecordError, SFTRecord
from deepeyes.data.trajectories import cold_start_trajectory
from deepeyes.data.writers import write_records, write_sft_records

__all__ = [
    "IMAGE_PLACEHOLDER",
    "Message",
    "Record",
    "RecordError",
    "SFTRecord",
    "SampleDataset",
    "cold_start_trajectory",
    "ensure_sample_data",
    "generate_sample_data",
    "read_records",
    "read_sft_records",
    "write_records",
    "write_sft_records",
]
