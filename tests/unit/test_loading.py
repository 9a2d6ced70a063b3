"""pipeline/release/loading.py: sampling params per stage, without a model or a server."""



from pipeline.release.loading import DEFAULT_PARAMS, stage_options

PROMPTS = ["a red circle on a white background", "a blue square on a white background"]


def test_stage_options_take_per_stage_then_scalar_then_config():
    p = {**DEFAULT_PARAMS, "guidance_scale": 4.0, "stage_guidance": [-1.0, 1.5], "stage_steps": [3],
         "sampler": "ddim"}
    a, b, c = stage_options(p, 3)
    assert (a.guidance_scale, a.steps, a.sampler) == (4.0, 3, "ddim")
    assert (b.guidance_scale, b.steps) == (1.5, None)
    assert (c.guidance_scale, c.steps) == (4.0, None)
    d = stage_options(DEFAULT_PARAMS, 1)[0]
    assert (d.guidance_scale, d.steps, d.sampler) == (None, None, None)
