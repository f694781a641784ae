"""bench/vae_ceiling.py on a few prompts: every size, the three image sets, and the evaluator reading
the real renders better than their blur."""

import json

from PIL import Image

from bench import vae_ceiling


def test_the_vae_ceiling_bench_reports_every_size_for_real_vae_and_blurred_images(tmp_path):
    out = vae_ceiling.main(["--prompts", "16", "--out", str(tmp_path / "ceiling.json"),
                            "--image", str(tmp_path / "trip.png")])
    result = json.loads(out.read_text())
    assert result["prompts"] == 16 and result["latent_channels"] >= 4 and "command" in result
    assert list(result["sizes"]) == ["32", "40", "48", "64"]
    for row in result["sizes"].values():
        assert set(row) == {"real", "vae", "real_blur3"}
        assert all(0 <= r["acc_one_object"] <= 1 and r["fd"] > -1e-3 for r in row.values())  # real vs real: ~0
        assert row["vae"]["psnr_db"] > 15
    # the renders read best as they are, and blur costs the smallest size the most
    small, full = result["sizes"]["32"], result["sizes"]["64"]
    assert small["real"]["acc_one_object"] >= small["real_blur3"]["acc_one_object"]
    assert small["real"]["fd"] < small["real_blur3"]["fd"] and full["real"]["acc_one_object"] == 1.0
    # the picture: 12 renders at 32 px, 4x, over their round trip
    assert Image.open(tmp_path / "trip.png").size == (12 * 128, 2 * 128)
