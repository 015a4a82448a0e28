"""Prompts as A1111 users write them: the grammar's pieces and weights, chunks of 75 tokens, and the ONNX pipeline's
images with weights, BREAK and long prompts against diffusers PyTorch given the same rules' embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from sd_utils.generation.prompt_syntax import chunks, is_break, parse
from sd_utils.runtime.pipeline import load_pipeline
from sd_utils.runtime.providers import PROVIDERS
from tests.test_parity import psnr

W = 1.1  # one pair of round brackets


def _pieces(prompt: str) -> list[tuple[str, float]]:
    return [("BREAK" if is_break(text) else text, round(weight, 6)) for text, weight in parse(prompt)]


@pytest.mark.parametrize(
    ("prompt", "pieces"),
    [
        ("a red circle", [("a red circle", 1.0)]),
        ("a (red) circle", [("a ", 1.0), ("red", W), (" circle", 1.0)]),
        ("((detailed)) [blurry]", [("detailed", round(W * W, 6)), (" ", 1.0), ("blurry", round(1 / W, 6))]),
        ("(masterpiece:1.2), cat", [("masterpiece", 1.2), (", cat", 1.0)]),
        ("(a (b:2) c)", [("a ", W), ("b", round(2 * W, 6)), (" c", W)]),  # nesting multiplies
        (r"a \(literal\) \[x\]", [("a (literal) [x]", 1.0)]),
        ("(unclosed to the end", [("unclosed to the end", W)]),
        ("[unclosed", [("unclosed", round(1 / W, 6))]),
        ("closed) with nothing open", [("closed) with nothing open", 1.0)]),
        ("a:b :1.5) c", [("a:b :1.5) c", 1.0)]),  # a weight with no open bracket is text
        ("cat BREAK dog", [("cat", 1.0), ("BREAK", -1.0), ("dog", 1.0)]),
        ("BREAKFAST break", [("BREAKFAST break", 1.0)]),  # upper case, a word on its own
        ("(red BREAK blue:1.3)", [("red", 1.3), ("BREAK", -1.0), ("blue", 1.3)]),
        ("", [("", 1.0)]),
    ],
)
def test_the_grammar_gives_a1111s_pieces_and_weights(prompt, pieces):
    assert _pieces(prompt) == pieces


@pytest.fixture(scope="module")
def tokenizers(tiny_spec):
    return [CLIPTokenizer.from_pretrained(tiny_spec.root / name) for name in ("tokenizer", "tokenizer_2")]


def test_a_plain_prompt_gives_a_plain_tokenizer_calls_ids(tokenizers):
    for tokenizer in tokenizers:  # tokenizer pads with <|endoftext|>, tokenizer_2 with "!" (id 0)
        for prompt in ("a red circle on the left, dark background", ""):
            plain = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
            (chunk,) = chunks(tokenizer, prompt)
            assert list(chunk.ids) == plain and chunk.weights == (1.0,) * 77


def test_long_prompts_break_and_a_boundary_inside_brackets(tokenizers):
    tokenizer = tokenizers[1]
    words = " ".join(f"cat{index % 2 * 's'}" for index in range(160))  # "cat" and "cats": one token each
    plain = tokenizer(words, add_special_tokens=False).input_ids
    assert len(plain) == 160
    made = chunks(tokenizer, words)
    assert [len(chunk.ids) for chunk in made] == [77, 77, 77]
    for number, chunk in enumerate(made):
        tokens = plain[75 * number : 75 * (number + 1)]
        padding = (tokenizer.pad_token_id,) * (75 - len(tokens))
        assert chunk.ids == (tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id, *padding)  # nothing cut
    # token 75 falls inside the brackets: their weight goes on in the next chunk
    first = " ".join(["cat"] * 70)
    weighted = chunks(tokenizer, f"{first} (a red circle on the left:1.5) dog")
    # 70 cats, then 6 tokens at 1.5: five end the first chunk, the sixth starts the second
    assert weighted[0].weights[71:76] == (1.5,) * 5 and weighted[1].weights[1:3] == (1.5, 1.0)
    # BREAK ends a chunk: the rest of it is padding
    broken = chunks(tokenizer, "a red circle BREAK a blue square")
    assert len(broken) == 2
    assert broken[0].ids[:5] == (tokenizer.bos_token_id, *tokenizer("a red circle").input_ids[1:-1], 49407)


# ------------------------------------------------------------------------------ images against diffusers PyTorch

PROMPTS = {
    "weights": ("a (red:1.4) circle on the [left], ((dark background))", "(blurry:1.3)"),
    "break": ("a red circle BREAK on the left, dark background", "green"),
    "long": (", ".join(["a very detailed red circle on the left"] * 12), "blurry"),  # > 75 tokens
    "long_positive_short_negative": (" ".join(["red"] * 90), None),
}


def _request(prompt: str, negative: str | None, **fields):
    """A one-image 64x64 request of ``prompt`` (``fields`` change the rest)."""
    from sd_utils.generation.request import GenerationRequest

    settings = {"num_images": 1, "batch_size": 1, "num_inference_steps": 1, "guidance_scale": 5.0, "seed": 0}
    return GenerationRequest(
        prompt=prompt, negative_prompt=negative, **{**settings, "width": 64, "height": 64, **fields}
    )


def _reference_embeddings(pipeline, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rules, written against diffusers' own PyTorch text encoders: per chunk and encoder the penultimate hidden
    states, each token's row times its weight, rescaled to the old mean; chunks along the sequence."""
    encoders = [(pipeline.tokenizer, pipeline.text_encoder), (pipeline.tokenizer_2, pipeline.text_encoder_2)]
    per_encoder, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in encoders:
            states = []
            for index, chunk in enumerate(chunks(tokenizer, prompt)):
                outputs = encoder(torch.tensor([chunk.ids]), output_hidden_states=True)
                if index == 0:
                    pooled = outputs[0]
                z = outputs.hidden_states[-2]
                mean = z.mean()
                z = z * torch.tensor(chunk.weights).reshape(1, -1, 1)
                states.append(z * (mean / z.mean()))
            per_encoder.append(torch.cat(states, dim=1))
    return torch.cat(per_encoder, dim=-1), pooled


@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_weighted_break_and_long_prompts_match_diffusers(tiny_optimized, tiny_spec, case):
    from diffusers import StableDiffusionXLPipeline

    from sd_utils.generation.output import to_pil_images  # noqa: F401 (the pipeline's own imports, loaded once)
    from sd_utils.generation.prompts import encode_prompt

    prompt, negative = PROMPTS[case]
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_spec.root, torch_dtype=torch.float32)
    hidden, pooled = _reference_embeddings(reference, prompt)
    if negative is None:  # the model's force_zeros_for_empty_prompt: zeros of the positive's length
        negative_hidden, negative_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    else:
        negative_hidden, negative_pooled = _reference_embeddings(reference, negative)
        empty, _ = _reference_embeddings(reference, "")
        while negative_hidden.shape[1] < hidden.shape[1]:
            negative_hidden = torch.cat([negative_hidden, empty], dim=1)
        while hidden.shape[1] < negative_hidden.shape[1]:
            hidden = torch.cat([hidden, empty], dim=1)
    chunk_count = hidden.shape[1] // 77
    assert chunk_count == {"weights": 1, "break": 2, "long": 2, "long_positive_short_negative": 2}[case]
    latents = torch.randn((1, tiny_spec.latent_channels, 8, 8), generator=torch.Generator().manual_seed(3))
    call = {"width": 64, "height": 64, "num_inference_steps": 3, "guidance_scale": 5.0, "output_type": "np"}
    expected = reference(
        prompt_embeds=hidden,
        negative_prompt_embeds=negative_hidden,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        latents=latents.clone(),
        **call,
    ).images
    request = _request(prompt, negative, num_inference_steps=3, guidance_scale=5.0, text_chunks=chunk_count)
    loaded = load_pipeline(
        tiny_optimized.build().optimized, tiny_spec, provider=PROVIDERS["cpu"], shape=request.shape, model_label="t"
    )
    embeddings = encode_prompt(loaded, request, 1)
    assert embeddings["prompt_embeds"].shape == (1, 77 * chunk_count, tiny_spec.cross_attention_dim)
    actual = loaded.pipeline(latents=latents.clone(), **embeddings, **call).images
    assert psnr(expected, actual) >= 60


def test_a_plain_prompt_is_encoded_exactly_as_before(tiny_optimized, tiny_spec):
    """The grammar's encoding of a plain prompt equals diffusers' ``encode_prompt`` on the same ONNX encoders, bit
    for bit (so a plain prompt's PNG is the one the tool made before it read weights)."""
    from sd_utils.generation.prompts import encode_prompt

    request = _request("a red circle on the left, dark background", "blurry", num_images=2, batch_size=2)
    loaded = load_pipeline(
        tiny_optimized.build().optimized, tiny_spec, provider=PROVIDERS["cpu"], shape=request.shape, model_label="t"
    )
    ours = encode_prompt(loaded, request, 2)
    theirs = loaded.pipeline.encode_prompt(
        prompt=[request.prompt] * 2, negative_prompt=[request.negative_prompt] * 2, do_classifier_free_guidance=True
    )
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, value in zip(names, theirs, strict=True):
        assert torch.equal(torch.as_tensor(np.asarray(ours[name])), torch.as_tensor(np.asarray(value))), name


# --------------------------------------------------------------------------------------------------- --from_png

A1111_PARAMETERS = (
    "masterpiece, (best quality:1.2), a red circle <lora:detail:0.8>\n"
    "on the left, dark background\n"
    "Negative prompt: lowres, (blurry:1.3)\n"
    "worst quality\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567, Size: 832x1216, "
    'Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Denoising strength: 0.35, Lora hashes: "detail: 62a4dfb3c1b0", '
    "Version: v1.10.1"
)


def test_an_a1111_parameters_text_gives_every_field():
    from sd_utils.generation.png_parameters import parse_parameters, scheduler_of

    found = parse_parameters(A1111_PARAMETERS)
    assert found.options == {
        # the LoRA tag stays: it applies at run time from --lora_dir
        "prompt": "masterpiece, (best quality:1.2), a red circle <lora:detail:0.8>\non the left, dark background",
        "negative_prompt": "lowres, (blurry:1.3)\nworst quality",
        "num_inference_steps": 28,
        "guidance_scale": 6.5,
        "seed": 1234567,
        "strength": 0.35,
        "width": 832,
        "height": 1216,
        "image_size": None,
        "scheduler": "dpmpp_2m_karras",
    }
    assert (found.model, found.model_hash) == ("sd_xl_base_1.0", "31e35c80fc")
    assert scheduler_of("Euler a", "Automatic") == "euler_a"
    assert scheduler_of("DPM++ 2M Karras", None) == "dpmpp_2m_karras"  # A1111 before schedule types
    assert scheduler_of("DPM++ 2M SDE", "Automatic") == "dpmpp_2m_sde"
    assert scheduler_of("Restart", "Automatic") is None  # not one of the tool's: the model's own runs


def test_from_png_makes_the_same_pixels_and_the_command_line_wins(tiny_optimized, tmp_path, capsys):
    from PIL import Image

    from stable_diffusion_xl import main

    run = "--num_inference_steps 3 --guidance_scale 6.5 --scheduler dpmpp_2m_karras --seed 42 --width 96 --height 64"
    prompt = ["--prompt", "a (red:1.3) circle, [blurry] BREAK dark", "--negative_prompt", "green, ugly"]
    assert main(tiny_optimized.tiny(run, *prompt, "--output_dir", str(tmp_path / "first"))) == 0
    (first,) = (tmp_path / "first").glob("*.png")
    assert main(tiny_optimized.tiny("", "--from_png", str(first), "--output_dir", str(tmp_path / "again"))) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert first.name == again.name and Image.open(first).tobytes() == Image.open(again).tobytes()
    assert Image.open(again).text["prompt"] == prompt[1]  # recorded as written
    args = ["--from_png", str(first), "--seed", "7", "--output_dir", str(tmp_path / "seven")]
    assert main(tiny_optimized.tiny("", *args)) == 0
    (seven,) = (tmp_path / "seven").glob("*.png")
    assert seven.name.endswith("-7.png") and Image.open(seven).size == (96, 64)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    capsys.readouterr()
    assert main(tiny_optimized.tiny("", "--from_png", str(tmp_path / "plain.png"))) == 2
    err = capsys.readouterr().err
    assert "has no A1111 parameters" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------- textual-inversion embeddings


def _embedding_file(path, widths=(32, 32), vectors=2, seed=0):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    save_file(
        {
            "clip_l": rng.standard_normal((vectors, widths[0])).astype(np.float32),
            "clip_g": rng.standard_normal((vectors, widths[1])).astype(np.float32),
        },
        path,
    )
    return path


def test_an_embedding_matches_diffusers_load_textual_inversion(tiny_optimized, tiny_spec, tmp_path):
    """The word of an embedding file in a prompt gives the hidden states diffusers gives after
    ``load_textual_inversion`` into both encoders, from the optimized encoders with no new build (weights apply too)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.numpy import load_file

    from sd_utils.generation.prompts import encode_prompt
    from sd_utils.sources.embeddings import load_embeddings

    path = _embedding_file(tmp_path / "shiny.safetensors")
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_spec.root, torch_dtype=torch.float32)
    tensors = load_file(path)
    for key, encoder, tokenizer in (
        ("clip_l", "text_encoder", "tokenizer"),
        ("clip_g", "text_encoder_2", "tokenizer_2"),
    ):
        reference.load_textual_inversion(
            torch.from_numpy(tensors[key]),
            token="shiny",
            text_encoder=getattr(reference, encoder),
            tokenizer=getattr(reference, tokenizer),
        )
    embeddings = load_embeddings([path], [], model_root=tiny_spec.root)
    for prompt in ("a shiny red circle, dark background", "a (shiny:1.3) red circle BREAK dark background"):
        request = _request(prompt, None, guidance_scale=1.0, text_chunks=2 if "BREAK" in prompt else 1)
        loaded = load_pipeline(
            tiny_optimized.build().optimized,
            tiny_spec,
            provider=PROVIDERS["cpu"],
            shape=request.shape,
            model_label="t",
            embeddings=embeddings,
        )
        ours = encode_prompt(loaded, request, 1)["prompt_embeds"]
        if "BREAK" in prompt:  # the grammar's chunks through diffusers' encoders, weights applied as A1111 does
            expected, _ = _reference_embeddings(reference, prompt.replace("shiny", "shiny shiny_1"))
        else:
            with torch.no_grad():
                expected = reference.encode_prompt(prompt=prompt, do_classifier_free_guidance=False)[0]
        assert psnr(expected.numpy(), ours.numpy(), peak=float(expected.abs().max())) >= 60, prompt


def test_embeddings_that_do_not_fit_are_one_line(tiny_optimized, tmp_path, capsys):
    from stable_diffusion_xl import main

    narrow = _embedding_file(tmp_path / "narrow.safetensors", widths=(16, 32))
    assert main(tiny_optimized.tiny("--prompt x", "--embedding", str(narrow))) == 2
    err = capsys.readouterr().err
    assert f"--embedding {narrow}: its clip_l vectors are 2x16, the model's text_encoder takes width 32" in err
    (tmp_path / "lora.safetensors").write_bytes(narrow.read_bytes()[:-10])  # an interrupted download
    assert main(tiny_optimized.tiny("--prompt x", "--embedding", str(tmp_path / "lora.safetensors"))) == 2
    assert "is incomplete" in capsys.readouterr().err
