"""lm-evaluation-harness against a real ondo server, through the harness's own `local-completions`
and `local-chat-completions` models, on the tasks defined in tasks/ (local data, no download).
The reference is the harness itself running the same model in-process through its Hugging Face
backend: the metrics must agree to the printed precision and every sample's scores to 1e-4."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

# No network here: the harness, datasets and the hub must use local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # the shared live_server helpers

from live_server import TINY_CONTEXT, live_server  # noqa: E402

TASKS = Path(__file__).parent / "tasks"
MODEL = "tiny"
PRINTED = "{:.4f}"   # the precision of the harness's results table
TOLERANCE = 1e-4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tiny_llama_with_tokenizer) -> Path:
    return tiny_llama_with_tokenizer[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    engine = {"model": str(model_dir), "max_model_len": TINY_CONTEXT}
    with live_server(tmp_path_factory.mktemp("eval"), engine, served_model_name=MODEL) as server:
        yield server


def evaluate(model: str, model_args: dict, tasks: list[str], chat: bool = False) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    # The task files name their data relative to their own folder.
    with contextlib.chdir(TASKS):
        return lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=tasks, batch_size=1, log_samples=True,
            apply_chat_template=chat, bootstrap_iters=0,
            task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))


def hf_args(model_dir: Path) -> dict:
    return {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"}


def assert_same_results(served: dict, reference: dict, tasks: list[str]) -> None:
    for task in tasks:
        metrics = {k: v for k, v in reference["results"][task].items()
                   if "," in k and "stderr" not in k}
        assert metrics, reference["results"][task]
        for name, value in metrics.items():
            assert PRINTED.format(served["results"][task][name]) == PRINTED.format(value), (task, name)
        served_samples = sorted(served["samples"][task], key=lambda s: s["doc_id"])
        reference_samples = sorted(reference["samples"][task], key=lambda s: s["doc_id"])
        assert len(served_samples) == len(reference_samples) > 0
        for got, expected in zip(served_samples, reference_samples):
            for got_resp, expected_resp in zip(got["resps"], expected["resps"]):
                if isinstance(expected_resp[0], str):      # a generation: the same text
                    assert got_resp == expected_resp, (task, got["doc_id"])
                else:                                       # (log-likelihood, is greedy)
                    (logprob, greedy), (expected_logprob, expected_greedy) = got_resp[0], expected_resp[0]
                    assert logprob == pytest.approx(expected_logprob, abs=TOLERANCE) and greedy == expected_greedy


def test_local_completions_scores_and_generates_like_the_hf_backend(server, model_dir):
    tasks = ["ondo_mc", "ondo_gen"]
    served = evaluate("local-completions", {
        "model": MODEL, "base_url": f"{server.url}/v1/completions",
        "tokenizer_backend": "huggingface", "tokenizer": str(model_dir)}, tasks)
    reference = evaluate("hf", hf_args(model_dir), tasks)
    assert_same_results(served, reference, tasks)
    assert len(served["samples"]["ondo_mc"]) == 12
    # The generations are real text, not empty answers that would agree trivially.
    assert sum(bool(s["resps"][0][0].strip()) for s in served["samples"]["ondo_gen"]) >= 3


def test_local_chat_completions_generates_like_the_hf_backend_with_the_chat_template(server, model_dir):
    served = evaluate("local-chat-completions", {
        "model": MODEL, "base_url": f"{server.url}/v1/chat/completions"}, ["ondo_gen"], chat=True)
    reference = evaluate("hf", hf_args(model_dir), ["ondo_gen"], chat=True)
    assert_same_results(served, reference, ["ondo_gen"])
    assert sum(bool(s["resps"][0][0].strip()) for s in served["samples"]["ondo_gen"]) >= 3
