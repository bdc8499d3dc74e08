"""Export, its gate and the model card, on the shared toy run (tests/conftest.py `tiny_run`).

References are computed independently of the code under test: peft's adapter-on-base forward, bitsandbytes' own
dequantization, the run's eval rows, plain transformers' generate, Go's text/template (when `go` is installed)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, invoke, one_error_line


def no_partial_left(out: Path) -> bool:
    return not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """The toy run's last stage exported through the CLI, with a GGUF asked for (no llama.cpp here)."""
    run, _, _ = tiny_run
    out = tmp_path_factory.mktemp("export") / "model"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("LLAMA_CPP_DIR", raising=False)
        result = invoke("export", run, "--out", out, "--gguf", "q4_k_m")
    assert result.exit_code == 0, result.output
    return run, out, result.output


def test_export_writes_a_standard_checkpoint_whose_logits_are_the_adapter_on_its_base(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, out, output = exported
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "export.json",
            "README.md", "chat_template.jinja"} <= {p.name for p in out.iterdir()}
    assert no_partial_left(out)
    record = json.loads((out / "export.json").read_text())
    assert (record["stage"], record["merged_into"], record["dtype"]) == ("distill", "original", "fp32")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "models" / "student-base"),
                                          run / "distill" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    plain = AutoModelForCausalLM.from_pretrained(run / "models" / "student-base").eval()
    ids = torch.randint(0, merged.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, base = reference(ids).logits, merged(ids).logits, plain(ids).logits
    assert (got - want).abs().max() < 1e-5
    assert (base - want).abs().max() > 1e-2  # the adapter changes the model: equality above is not vacuous
    # the command's last line is the gate's verdict, and export.json holds the same result
    assert output.strip().splitlines()[-1].startswith("export gate passed: ")
    assert record["gate"]["passed"] and record["gate"]["problems"] == TINY["generate.num_eval_problems"]


def test_round_trip_plain_transformers_answers_like_the_runs_eval(exported):
    """Reload with nothing but transformers, generate with the export's own generation config: the run's eval
    answers, on every held-out problem."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, out, _ = exported
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    rows = [json.loads(line) for line in (run / "eval" / "distill" / "results.jsonl").read_text().splitlines()]
    for row in rows:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        reply = model.generate(**inputs)[0, inputs["input_ids"].shape[1]:]
        assert tokenizer.decode(reply, skip_special_tokens=True) == row["completion"], row["id"]


def test_model_card_in_the_export_and_the_run_folder(exported):
    from budget_reasoner.model_card import wilson_interval

    run, out, _ = exported
    report = json.loads((run / "report.json").read_text())
    for card in (out / "README.md", run / "MODEL_CARD.md"):
        text = card.read_text()
        for stage in ("base", "sft", "dpo", "distill"):
            accuracy, n = report["stages"][stage]["accuracy"], report["stages"][stage]["problems"]
            low, high = wilson_interval(accuracy, n)
            assert f"| {stage} |" in text and f"{accuracy:.1%} [{low:.1%}, {high:.1%}] of {n}" in text, stage
        assert "<think>" in text and "\\boxed{" in text and "Licences" in text and "Apache-2.0" in text
    assert (out / "README.md").read_text().startswith("---\nlicense: ")
    assert "Export gate" in (out / "README.md").read_text()


def test_wilson_interval_matches_the_textbook_value():
    from budget_reasoner.model_card import wilson_interval

    low, high = wilson_interval(0.5, 100)  # Wilson (1927): 50/100 -> [0.4038, 0.5962]
    assert abs(low - 0.4038) < 1e-4 and abs(high - 0.5962) < 1e-4
    assert wilson_interval(0.0, 12)[0] == 0.0 and wilson_interval(0.0, 12)[1] > 0.2


def test_gguf_without_llama_cpp_is_one_line_and_the_modelfile_is_still_written(exported):
    from transformers import AutoTokenizer

    _, out, output = exported
    lines = [line for line in output.splitlines() if line.startswith("GGUF:")]
    assert len(lines) == 1 and "git clone https://github.com/ggml-org/llama.cpp" in lines[0]
    assert not list((out / "gguf").glob("*.gguf"))
    modelfile = (out / "gguf" / "Modelfile").read_text()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert modelfile.startswith("FROM ./model-q4_k_m.gguf\n")
    assert f'PARAMETER stop "{tokenizer.eos_token}"' in modelfile
    assert "{{ .Thinking }}" in modelfile and "PARAMETER temperature 0" in modelfile


GO_RENDER = """package main
import ("encoding/json"; "os"; "text/template")
type Message struct { Role, Content, Thinking string }
type Values struct { System string; Messages []Message; Think, IsThinkSet bool }
func main() {
    source, _ := os.ReadFile(os.Args[1])
    var values Values
    json.Unmarshal([]byte(os.Args[2]), &values)
    template.Must(template.New("t").Parse(string(source))).Execute(os.Stdout, values)
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="Go's text/template (Ollama's template engine) is not installed")
def test_the_modelfile_template_renders_what_the_chat_template_renders(exported, tmp_path):
    """Rendered by Go's text/template, as Ollama does, the TEMPLATE gives the prompt the exported tokenizer's chat
    template gives (thinking of earlier turns dropped by both); `think: false` prefills an empty thought."""
    from transformers import AutoTokenizer

    from budget_reasoner.export.gguf import CHATML_TEMPLATE

    _, out, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(out)
    (tmp_path / "render.go").write_text(GO_RENDER)
    (tmp_path / "template").write_text(CHATML_TEMPLATE)

    def go(values: dict) -> str:
        return subprocess.run(["go", "run", str(tmp_path / "render.go"), str(tmp_path / "template"), json.dumps(values)],
                              capture_output=True, text=True, check=True, cwd=tmp_path,
                              env={**os.environ, "GOCACHE": str(tmp_path / "cache"), "GO111MODULE": "off"}).stdout

    conversations = [
        [{"role": "user", "content": "12+7-5"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12+7-5"}],
        [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "<think>\n1+1=2\n</think>\n\\boxed{2}"},
         {"role": "user", "content": "2+2"}],
    ]
    for messages in conversations:
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ollama = [{"Role": m["role"], "Content": m["content"].split("</think>")[-1].lstrip("\n")} for m in messages]
        assert go({"Messages": ollama}) == want, messages
    empty_thought = go({"Messages": [{"Role": "user", "Content": "1+1"}], "IsThinkSet": True, "Think": False})
    assert empty_thought.endswith("<|im_start|>assistant\n<think>\n</think>\n")


def test_gguf_conversion_calls_llama_cpp_and_quantizes(tmp_path, monkeypatch):
    """The converter and llama-quantize are llama.cpp's: stand-ins record how they are called."""
    from budget_reasoner.export.gguf import missing_tools, write_gguf

    root = tmp_path / "llama.cpp"
    (root / "build" / "bin").mkdir(parents=True)
    (root / "convert_hf_to_gguf.py").write_text(
        "import sys, pathlib\nargs = sys.argv[1:]\npathlib.Path(args[args.index('--outfile') + 1]).write_text(' '.join(args))\n")
    quantize = root / "build" / "bin" / "llama-quantize"
    quantize.write_text("#!/bin/sh\necho \"$1 -> $3\" > \"$2\"\n")
    quantize.chmod(0o755)
    monkeypatch.setenv("LLAMA_CPP_DIR", str(root))
    assert missing_tools("q4_k_m") is None
    written = write_gguf(tmp_path / "model", tmp_path / "gguf", "q4_k_m")
    assert written.name == "model-q4_k_m.gguf" and written.read_text().strip().endswith("-> Q4_K_M")
    assert not (tmp_path / "gguf" / "model-f16.gguf").exists()  # the intermediate f16 is removed
    direct = write_gguf(tmp_path / "model", tmp_path / "gguf", "q8_0").read_text()
    assert direct.split() == [str(tmp_path / "model"), "--outfile", str(tmp_path / "gguf" / "model-q8_0.gguf"),
                              "--outtype", "q8_0"]


def test_a_merge_that_disagrees_fails_loudly_and_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    from budget_reasoner.export import merge

    run, _, _ = tiny_run
    original = merge.add_adapter_in_fp32

    def twice(model):  # a wrong merge: the adapter added twice
        original(model)
        return original(model)

    monkeypatch.setattr(merge, "add_adapter_in_fp32", twice)
    out = tmp_path / "bad"
    line = one_error_line(invoke("export", run, "--stage", "sft", "--out", out))
    assert "export gate FAILED" in line and "nothing was exported" in line
    assert not out.exists() and no_partial_left(out)


def test_4bit_stage_merges_into_the_dequantized_nf4_weights_it_trained_against(tiny_run, tmp_path):
    """A QLoRA stage: the merged weights are bitsandbytes' dequant(NF4(W)) + peft's delta, and the export matches
    the adapter on the 4-bit base (as it trained: the layers' training-mode path) far closer than a merge into the
    original 16-bit weights does."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from peft.utils.integrations import dequantize_bnb_weight
    from transformers import AutoModelForCausalLM

    from budget_reasoner.config import TinyModelConfig, load_preset
    from budget_reasoner.export import ExportOptions, export_model
    from budget_reasoner.models import build_tiny_model, load_model, load_tokenizer
    from budget_reasoner.train.sft import sft

    run, _, _ = tiny_run
    base = tmp_path / "base"  # bitsandbytes' CPU inference packs 64-wide blocks: the toy 32-wide model is too narrow
    tokenizer = load_tokenizer(run / "models" / "student-base")
    shape = TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=128)
    build_tiny_model(tokenizer, shape, 96, seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    preset = load_preset("cpu-tiny", {**TINY, "quantization.load_in_4bit": True, "sft.learning_rate": 0.01})
    sft(run / "data" / "sft" / "train.jsonl", base, tmp_path / "sft4", preset)
    outputs = {}
    for target in ("auto", "original"):
        outputs[target] = tmp_path / f"export-{target}"
        # the gate runs on the default merge; the 'original' one is measured below, by logits
        record = export_model(tmp_path / "sft4", outputs[target], ExportOptions(
            merge_into=target, gate_problems=4 if target == "auto" else 0,
            problems=run / "data" / "problems" / "held_out.jsonl"))
        assert record["merged_into"] == ("dequantized" if target == "auto" else "original")

    from budget_reasoner.hardware import detect

    reference = PeftModel.from_pretrained(load_model(base, preset, detect("cpu", "bitsandbytes")), tmp_path / "sft4" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(outputs["auto"])
    layer = reference.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    want = dequantize_bnb_weight(layer.base_layer.weight, layer.base_layer.weight.quant_state) + layer.get_delta_weight("default")
    assert (merged.model.layers[0].self_attn.q_proj.weight - want).abs().max() < 1e-6
    reference.train()  # Linear4bit's training path: dequantize, then matmul (what every training step computed)
    ids = torch.randint(0, merged.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = reference(ids).logits
        errors = {target: (AutoModelForCausalLM.from_pretrained(path)(ids).logits - trained).abs().max().item()
                  for target, path in outputs.items()}
    assert errors["auto"] < 1e-4 and errors["original"] > 30 * errors["auto"], errors


def test_bad_input_is_one_line_and_leaves_nothing_behind(tiny_run, tmp_path, monkeypatch):
    run, _, _ = tiny_run
    out = tmp_path / "out"
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    shutil.copy(run / "run.json", empty_run / "run.json")
    assert "holds no trained stage" in one_error_line(invoke("export", empty_run, "--out", out))
    damaged = tmp_path / "damaged-run"
    shutil.copytree(run, damaged, ignore=shutil.ignore_patterns("eval", "data", "distill"))
    (damaged / "sft" / "adapter" / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors is missing" in one_error_line(invoke("export", damaged, "--stage", "sft", "--out", out))
    moved = tmp_path / "moved-sft"  # a stage folder without the run its base lives in
    shutil.copytree(run / "sft", moved)
    assert "base model '../models/student-base'" in one_error_line(invoke("export", moved, "--out", out))
    hub_adapter = tmp_path / "hub-adapter"  # an adapter over a hub model that is not in the cache
    shutil.copytree(run / "sft" / "adapter", hub_adapter)
    config = json.loads((hub_adapter / "adapter_config.json").read_text())
    (hub_adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "nobody/no-such-model"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "not in the local Hugging Face cache" in one_error_line(invoke("export", hub_adapter, "--out", out))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token stored by `hf auth login` either
    assert "needs a Hugging Face token" in one_error_line(invoke("export", run, "--out", out, "--push-to-hub", "me/r"))
    assert not out.exists() and no_partial_left(out)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "exists and is not empty" in one_error_line(invoke("export", run, "--out", out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and no_partial_left(out)


def test_push_uploads_the_export_and_the_token_is_never_written(tiny_run, tmp_path, monkeypatch):
    import huggingface_hub

    run, _, _ = tiny_run
    token = "hf_TestTokenThatMustNotLeak0123456789"
    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", token)
    out = tmp_path / "pushed"
    result = invoke("export", run, "--stage", "sft", "--adapter-only", "--out", out, "--push-to-hub", "me/reasoner")
    assert result.exit_code == 0, result.output
    assert calls[0] == ("token", token) and calls[1] == ("create", "me/reasoner")
    assert calls[2][:2] == ("upload", "me/reasoner") and {"adapter_config.json", "README.md", "export.json"} <= set(calls[2][2])
    assert token not in result.output
    assert all(token.encode() not in path.read_bytes() for path in out.rglob("*") if path.is_file())
