"""Data: reading files, task schemas, chat formatting with answer-only loss, DataModules."""

from lightning_qlora.data.datamodule import PromptAnswerDataModule, collate
from lightning_qlora.data.formatting import encode_pair, prompt_text
from lightning_qlora.data.io import read_rows
from lightning_qlora.data.tasks import TASKS, Task, get_task

__all__ = ["TASKS", "PromptAnswerDataModule", "Task", "collate", "encode_pair", "get_task", "prompt_text", "read_rows"]
