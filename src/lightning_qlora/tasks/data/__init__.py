"""Data: reading files, task schemas, chat formatting with answer-only loss, DataModules (token tags too)."""

from lightning_qlora.tasks.data.datamodule import PromptAnswerDataModule, TextClassificationDataModule, collate
from lightning_qlora.tasks.data.formatting import encode_pair, prompt_text
from lightning_qlora.tasks.data.io import looks_like_hub_id, read_hub_splits, read_rows
from lightning_qlora.tasks.data.tasks import TASKS, Task, get_task
from lightning_qlora.tasks.data.token_data import TokenClassificationDataModule, align_labels, words_tokenizer

__all__ = [
    "TASKS",
    "PromptAnswerDataModule",
    "Task",
    "TextClassificationDataModule",
    "TokenClassificationDataModule",
    "align_labels",
    "collate",
    "encode_pair",
    "get_task",
    "looks_like_hub_id",
    "read_hub_splits",
    "prompt_text",
    "read_rows",
    "words_tokenizer",
]
