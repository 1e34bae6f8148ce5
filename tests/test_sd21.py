"""sd21's exact architecture from the shipped configs (built on the meta device: no memory)."""

import pytest
import torch

import fastdiff


@pytest.fixture(scope="module")
def random_sd21():
    pytest.importorskip("diffusers")
    from fastdiff.models.tokenizer import open_clip_bpe_path

    if open_clip_bpe_path() is None:
        pytest.skip("the CLIP BPE vocabulary comes from open_clip: pip install --no-deps open_clip_torch")
    return fastdiff.build_engine("sd21", weights="random", device="meta", dtype=torch.float16)


def test_random_sd21_has_the_exact_parameter_counts(random_sd21):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(random_sd21.unet) == 865_910_724
    assert count(random_sd21.decoder.vae) == 83_653_863
    assert count(random_sd21.conditioner.text_encoder) == 340_387_840
    assert random_sd21.image_size == 768 and random_sd21.schedule.prediction_type == "v_prediction"


def test_random_sd21_is_flagged(random_sd21):
    assert random_sd21.random_weights and "RANDOM WEIGHTS" in repr(random_sd21)


def test_sd21_tokenizer_is_the_real_clip_bpe(random_sd21):
    tokenizer = random_sd21.conditioner.tokenizer
    ids = tokenizer("a photograph of an astronaut riding a horse", padding="max_length", max_length=77).input_ids
    # OpenAI/OpenCLIP token ids; SD 2.x pads with "!" (id 0)
    assert ids[:11] == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407, 0]


@pytest.mark.gpu
def test_random_sd21_samples_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    engine = fastdiff.build_engine("sd21", weights="random", device="cuda")
    out = engine.sample("a photograph of an astronaut riding a horse", steps=2, height=256, width=256, seed=0)
    assert out.random_weights and "random weights" in out.notes[0]
