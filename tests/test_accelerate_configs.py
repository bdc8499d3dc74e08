"""The accelerate configs shipped in presets/accelerate/ load with accelerate's own loader (what
`accelerate launch --config_file` calls), and every nested key is one `accelerate launch` knows: the loader checks
only the top-level keys, and the launcher copies fsdp_config / deepspeed_config entries onto its arguments by name."""

from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "presets" / "accelerate").glob("*.yaml"))


def launcher_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


def test_the_three_routes_are_shipped():
    assert {path.stem for path in CONFIGS} == {"ddp", "fsdp2-qlora", "deepspeed-zero3"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_loads_with_accelerates_loader(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig) and config.num_machines == 1 and config.num_processes >= 2
    expected = {"ddp": DistributedType.MULTI_GPU, "fsdp2-qlora": DistributedType.FSDP,
                "deepspeed-zero3": DistributedType.DEEPSPEED}[path.stem]
    assert config.distributed_type == expected
    known = launcher_options()
    nested = [key if key.startswith("fsdp") else f"fsdp_{key}" for key in config.fsdp_config] + list(config.deepspeed_config)
    assert [key for key in nested if key not in known] == []
    if expected == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_version"] == 2
    if expected == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 3


def test_quant_storage_reaches_bitsandbytes(tmp_path):
    """FSDP shards parameters of one dtype: quantization.quant_storage sets the dtype the packed 4-bit weights are
    stored in, and the weights dequantize to the same values whatever it is."""
    import torch

    from budget_reasoner.config import load_preset
    from budget_reasoner.hardware import hardware_for
    from budget_reasoner.models import build_tiny_model, build_tokenizer, load_model

    tokenizer = build_tokenizer(["1+2=3 4*5=20 9-7=2"] * 20)
    preset = load_preset("cpu-tiny", {"model.tiny_student.hidden_size": 64, "model.tiny_student.num_layers": 1})
    build_tiny_model(tokenizer, preset.model.tiny_student, preset.model.max_length, seed=0).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    dequantized = {}
    for storage in ("uint8", "float32"):
        preset = load_preset("cpu-tiny", {"model.tiny_student.hidden_size": 64, "model.tiny_student.num_layers": 1,
                                          "quantization.load_in_4bit": True, "quantization.quant_storage": storage})
        model = load_model(tmp_path, preset, hardware_for(preset))
        projection = model.model.layers[0].self_attn.q_proj
        assert projection.weight.dtype == getattr(torch, storage)
        import bitsandbytes.functional as bnb

        dequantized[storage] = bnb.dequantize_4bit(projection.weight.data, projection.weight.quant_state)
    assert torch.equal(dequantized["uint8"], dequantized["float32"])


def test_quant_storage_is_checked():
    from budget_reasoner.config import load_preset
    from budget_reasoner.errors import BudgetReasonerError

    with pytest.raises(BudgetReasonerError, match="quant_storage"):
        load_preset("cpu-tiny", {"quantization.quant_storage": "int4"})
