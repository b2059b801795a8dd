"""``histomoe train`` / ``histomoe predict``: bundles, slide readers, tissue grid, outputs, bad inputs.

Bundles are trained on the synthetic dataset with the ``tiny`` encoder (32 px patches); slides are small images
made here: a pyramidal TIFF written with tifffile (pixel size in its resolution tags) and a JPEG.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import tifffile
from PIL import Image

from histomoe_core.cli import main

UM_PER_PX = 0.875  # 112 µm patches are 128 px at level 0: read at the 4x level for 32 px output
TRAIN = ["train", "--datasets", "synthetic", "--encoder", "tiny", "--text-encoder", "onehot", "--n-genes", "10",
         "--out-px", "32"]


def tissue_image(side: int, seed: int = 0) -> np.ndarray:
    """White glass with a textured pink-purple disc of tissue (radius a third of the side)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    disc = (xx - side / 2) ** 2 + (yy - side / 2) ** 2 < (side / 3) ** 2
    img = np.full((side, side, 3), 242, np.uint8)
    texture = rng.integers(-40, 40, (side // 8, side // 8, 1)).repeat(8, 0).repeat(8, 1)
    stain = np.clip(np.array([200, 110, 170]) + texture, 0, 255).astype(np.uint8)
    img[disc] = stain[disc]
    return img


def write_pyramid(path: Path, img: np.ndarray, um_per_px: float | None = UM_PER_PX, compression: str = "zlib") -> Path:
    res = {} if um_per_px is None else {"resolution": (1e4 / um_per_px, 1e4 / um_per_px),
                                         "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), subifds=2, photometric="rgb", compression=compression, **res)
        for d in (2, 4):
            tw.write(np.ascontiguousarray(img[::d, ::d]), tile=(256, 256), subfiletype=1, photometric="rgb",
                     compression=compression)
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    assert main([*TRAIN, "--model", "ridge_cv", "--out", str(root / "ridge")]) == 0
    assert main([*TRAIN, "--model", "moe_soft_mlp", "--epochs", "2", "--out", str(root / "moe")]) == 0
    assert main([*TRAIN, "--model", "histomoe", "--epochs", "1", "--out", str(root / "meta")]) == 0  # routes on metadata
    return root


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    img = tissue_image(2048)
    Image.fromarray(img[::2, ::2]).save(root / "slide.jpg", quality=95)
    Image.fromarray(np.full((512, 512, 3), 245, np.uint8)).save(root / "blank.png")
    (root / "notes.png").write_text("not an image")
    return {"tiff": write_pyramid(root / "slide.tif", img), "jpg": root / "slide.jpg",
            "blank": root / "blank.png", "text": root / "notes.png",
            "tiff_nopx": write_pyramid(root / "nopx.tif", img, None)}


def test_bundle_manifest_and_load(bundles):
    from histomoe_core.bundle import load_bundle

    b = load_bundle(bundles / "moe")
    man = b.manifest
    assert man["encoder"]["name"] == "tiny" and man["encoder"]["cache_id"]["weights"].startswith("tiny-seed0")
    assert man["patch"]["out_px"] == 32 and len(b.genes) == 10 == man["panel"]["n_genes"]
    assert set(man["files"]) == {"model.pt", "train_embeddings.npz"}
    assert man["provenance"]["dataset_sha256"] and len(man["provenance"]["sections"]) == 9
    assert b.estimator.model.cfg.n_genes == 10 and b.train_x.shape == (1080, 16)
    ridge = load_bundle(bundles / "ridge")
    assert ridge.manifest["model"]["spec"]["kind"] == "ridge_cv" and ridge.manifest["model"]["format"] == "pickle"
    assert ridge.manifest["model"]["info"]["alpha"] > 0  # the fitted parameters travel with the bundle


def test_predict_pyramidal_tiff_grid(bundles, slides, tmp_path, monkeypatch):
    from histomoe_core.slide import reader

    reads = []
    real = reader.TiffSlide.read
    monkeypatch.setattr(reader.TiffSlide, "read", lambda self, x, y, w, h, level=0: (
        reads.append((level, w, h)), real(self, x, y, w, h, level))[1])
    out = tmp_path / "pred"
    rc = main(["predict", str(slides["tiff"]), "--model", str(bundles / "moe"), "--thumb-px", "512",
               "--out", str(out), "--no-progress", "--no-zarr"])
    assert rc == 0
    a = ad.read_h5ad(out / "predictions.h5ad")
    # the tissue disc covers pi/9 of the slide: the grid keeps about that share of its 16 x 16 cells
    assert 0.25 < a.n_obs / 256 < 0.45
    assert a.n_vars == 10 and np.isfinite(a.X).all()
    xy = a.obsm["spatial"]
    assert np.allclose(a.obs["x_um"], xy[:, 0] * UM_PER_PX)
    assert {"histomoe_gates", "histomoe_experts"} <= set(a.obsm) and a.obsm["histomoe_gates"].shape == (a.n_obs, 4)
    assert (a.obs["uncertainty"] > 0).all() and (a.obs["novelty"] > 0).all()
    assert json.loads(a.uns["provenance"])["prediction"]["um_per_px"] == pytest.approx(UM_PER_PX)
    assert {lvl for lvl, _, _ in reads} == {2}, "patches and thumbnail come from the 4x level, never level 0"
    assert (out / "maps" / "dominant_expert.png").stat().st_size > 0


def test_predict_jpeg_spots_zarr_scanpy(bundles, slides, tmp_path):
    import scanpy as sc
    import spatialdata

    spots = tmp_path / "spots.csv"
    spots.write_text("barcode,x,y\nA,512,512\nB,600,480\nC,300,700\n")
    out = tmp_path / "pred"
    gene = json.loads((bundles / "ridge" / "bundle.json").read_text())["genes"][1]
    rc = main(["predict", str(slides["jpg"]), "--model", str(bundles / "ridge"), "--um-per-px", str(2 * UM_PER_PX),
               "--spots", str(spots), "--out", str(out), "--no-progress", "--genes", gene])
    assert rc == 0
    a = sc.read_h5ad(out / "predictions.h5ad")
    assert list(a.obs_names) == ["A", "B", "C"] and a.obs["uncertainty"].isna().all()
    assert "spatial" in a.uns and a.obsm["spatial"].tolist()[1] == [600.0, 480.0]
    sdata = spatialdata.read_zarr(out / "predictions.zarr")
    assert set(sdata.shapes) == {"spots"} and sdata.tables["table"].n_obs == 3 and "slide" in sdata.images
    assert (out / "maps" / f"{gene}.png").exists()


def test_tile_reader_matches_dataset_crops(slides):
    """At level 0 the tile reader cuts the same pixels as the dataset path, and resizes them the same way."""
    from histomoe_core.data.patches import PatchSpec, crop_boxes, pil_patches
    from histomoe_core.slide.patches import SlidePatches
    from histomoe_core.slide.reader import open_slide_image

    img = tissue_image(2048)
    slide = open_slide_image(slides["tiff"])
    boxes = crop_boxes(np.array([[1000.0, 1000.0], [1130.0, 1000.0], [30.0, 40.0]]), PatchSpec().crop_px(UM_PER_PX))
    got = SlidePatches(slide).read_patches(boxes, 0, 64)
    slide.close()
    want = pil_patches(Image.fromarray(img), boxes, 64)
    assert np.array_equal(got, want)


def _fails(args, capsys, *needles) -> str:
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.count("\n") == 0 and err.startswith("histomoe: error:"), err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("case, needles", [
    ("text", ("not an image",)),
    ("jpg_no_px", ("--um-per-px",)),
    ("tiff_nopx", ("--um-per-px",)),
    ("blank", ("no tissue found",)),
])
def test_bad_slides(bundles, slides, tmp_path, capsys, case, needles):
    slide = {"text": slides["text"], "jpg_no_px": slides["jpg"], "tiff_nopx": slides["tiff_nopx"],
             "blank": slides["blank"]}[case]
    extra = ["--um-per-px", "1.0"] if case in ("text", "blank") else []
    out = tmp_path / "out"
    _fails(["predict", str(slide), "--model", str(bundles / "ridge"), "--out", str(out), "--no-progress", *extra],
           capsys, *needles)
    assert not out.exists()


def test_bundle_from_another_encoder(bundles, slides, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(bundles / "ridge", other)
    man = json.loads((other / "bundle.json").read_text())
    man["encoder"]["cache_id"]["weights"] = "tiny-seed1-0123456789abcdef"
    (other / "bundle.json").write_text(json.dumps(man))
    out = tmp_path / "out"
    _fails(["predict", str(slides["jpg"]), "--model", str(other), "--um-per-px", "1.75", "--out", str(out)],
           capsys, "tiny-seed1-0123456789abcdef", "retrain")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncate_weights", "garbage_manifest", "no_manifest"])
def test_corrupt_bundle(bundles, slides, tmp_path, capsys, damage):
    bad = tmp_path / "bad"
    shutil.copytree(bundles / "moe", bad)
    if damage == "truncate_weights":
        data = (bad / "model.pt").read_bytes()
        (bad / "model.pt").write_bytes(data[: len(data) // 2])
    elif damage == "garbage_manifest":
        (bad / "bundle.json").write_text("{not json")
    else:
        (bad / "bundle.json").unlink()
    out = tmp_path / "out"
    _fails(["predict", str(slides["jpg"]), "--model", str(bad), "--um-per-px", "1.75", "--out", str(out)],
           capsys, "histomoe train")
    assert not out.exists()


def test_resume_reads_the_embedding_cache(bundles, slides):
    from histomoe_core.bundle import load_bundle
    from histomoe_core.embed import run_embedding
    from histomoe_core.slide.patches import SlidePatches
    from histomoe_core.slide.predict import predict_slide, slide_sample
    from histomoe_core.slide.reader import open_slide_image

    b = load_bundle(bundles / "ridge")
    first = predict_slide(slides["tiff"], b, progress=False, name="resume")
    slide = open_slide_image(slides["tiff"])
    sample = slide_sample(slides["tiff"], first.adata.obs.assign(x=first.adata.obsm["spatial"][:, 0],
                                                                  y=first.adata.obsm["spatial"][:, 1])[["x", "y"]],
                          slide.um_per_px, {}, "resume")
    from histomoe_core.data.patches import PatchSpec

    _, stats = run_embedding([sample], "tiny", spec=PatchSpec(**b.patch), reader=SlidePatches(slide), progress=False)
    slide.close()
    assert stats.cached == ["resume"] and stats.n_patches == 0


def test_spots_from_a_space_ranger_folder(tmp_path):
    from histomoe_core.slide.predict import read_spots

    spatial = tmp_path / "outs" / "spatial"
    spatial.mkdir(parents=True)
    (spatial / "tissue_positions.csv").write_text(
        "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
        "AAAC-1,1,0,0,100,200\nAAAG-1,0,0,2,100,300\nAAAT-1,1,1,1,180,250\n")
    spots = read_spots(tmp_path / "outs")
    assert list(spots.index) == ["AAAC-1", "AAAT-1"]  # spots off tissue left out
    assert spots.loc["AAAT-1"].tolist() == [250.0, 180.0]  # x = column, y = row
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="tissue_positions"):
        read_spots(tmp_path / "empty")


def test_openslide_and_tifffile_read_the_same_pixels(tmp_path):
    """A tiled TIFF pyramid (levels as pages) read through OpenSlide and through tifffile, at every level and
    across the slide's edge (white outside)."""
    import openslide

    from histomoe_core.slide.reader import OpenSlideSlide, TiffSlide

    img = tissue_image(1024)
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tw:
        for d in (1, 2, 4):
            tw.write(np.ascontiguousarray(img[::d, ::d]), tile=(256, 256), photometric="rgb", compression="zlib",
                     subfiletype=0 if d == 1 else 1, resolution=(1e4 / UM_PER_PX, 1e4 / UM_PER_PX),
                     resolutionunit="CENTIMETER")
    a = OpenSlideSlide(path, openslide.OpenSlide(str(path)))
    b = TiffSlide(path, tifffile.TiffFile(path))
    assert a.downsamples == b.downsamples == (1.0, 2.0, 4.0)
    assert a.um_per_px == pytest.approx(UM_PER_PX) and b.um_per_px == pytest.approx(UM_PER_PX)
    for level in range(3):
        ra, rb = a.read(-40, 900, 300, 200, level), b.read(-40, 900, 300, 200, level)
        assert ra.shape == rb.shape and np.array_equal(ra, rb)
        assert (ra[:, :5] == 255).all()  # left of the slide: white glass
    a.close()
    b.close()


def test_spots_outside_the_slide(bundles, slides, tmp_path, capsys):
    spots = tmp_path / "spots.csv"
    spots.write_text("x,y\n100,100\n5000,100\n")
    out = tmp_path / "out"
    _fails(["predict", str(slides["tiff"]), "--model", str(bundles / "ridge"), "--spots", str(spots),
            "--out", str(out)], capsys, "outside the 2048x2048 px slide")
    assert not out.exists()


def test_jpeg_compressed_pyramid(tmp_path):
    """Scanners' pyramids are mostly JPEG-compressed TIFFs: tifffile decodes them (imagecodecs) level by level."""
    from histomoe_core.slide.reader import open_slide_image, thumbnail

    img = tissue_image(1024)
    slide = open_slide_image(write_pyramid(tmp_path / "jpeg.tif", img, compression="jpeg"))
    assert slide.backend == "tifffile" and slide.downsamples == (1.0, 2.0, 4.0)
    region = slide.read(300, 200, 256, 128, 1)
    assert region.shape == (64, 128, 3)
    assert np.abs(region.astype(int) - img[200:328:2, 300:556:2]).mean() < 8  # lossy, but the same picture
    thumb, ds = thumbnail(slide, max_px=256)
    assert thumb.shape[:2] == (256, 256) and ds == 4.0
    slide.close()


def test_saturation_matches_skimage():
    from skimage import color

    from histomoe_core.slide.tissue import saturation_value

    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    rgb[0, 0] = 0  # black: saturation 0 by definition
    sat, val = saturation_value(rgb)
    hsv = color.rgb2hsv(rgb)
    assert np.allclose(sat, hsv[..., 1], atol=1e-6) and np.allclose(val, hsv[..., 2], atol=1e-6)


@pytest.mark.parametrize("args, needle", [
    (["--model", "no_such_model"], "unknown models"),
    (["--model", "ridge_cv", "--exclude-patient", "ZZ"], "no such patient"),
    (["--model", "ridge_cv", "--sections", "CCRCC-P1-S1"], "at least two"),
])
def test_train_bad_requests(tmp_path, capsys, args, needle):
    out = tmp_path / "bundle"
    _fails([*TRAIN, *args, "--out", str(out)], capsys, needle)
    assert not out.exists()


def test_retention_curve_and_uncertainty_report():
    from histomoe_core.slide.validation import retention_curve, smooth_at, uncertainty_report

    err = np.array([4.0, 3.0, 2.0, 1.0])
    assert retention_curve(err, -err, fractions=(0.25, 0.5, 1.0)).tolist() == [4.0, 3.5, 2.5]  # worst first
    assert retention_curve(err, err, fractions=(0.25, 0.5, 1.0)).tolist() == [1.0, 1.5, 2.5]  # best first
    y = np.zeros((4, 2))
    p = np.sqrt(err)[:, None] * np.ones((1, 2))
    rho, curves = uncertainty_report(y, p, {"perfect": err, "reversed": -err, "undefined": np.full(4, np.nan)})
    assert rho.loc["perfect"].iloc[0] == pytest.approx(1.0) and rho.loc["reversed"].iloc[0] == pytest.approx(-1.0)
    assert "undefined" not in rho.index and (curves["random"] == err.mean()).all()
    grid = np.array([[0.0, 0.0], [10.0, 0.0]])
    vals, covered = smooth_at(grid, np.array([[1.0], [3.0]]), np.array([[5.0, 0.0], [100.0, 0.0]]), sigma=2.0)
    assert covered.tolist() == [True, False] and vals[0, 0] == pytest.approx(2.0)  # midway: the mean of both


def test_load_refuses_an_encoder_with_other_weights(bundles):
    from histomoe_core.bundle import BundleError, load_bundle
    from histomoe_core.encoders import create_encoder

    assert load_bundle(bundles / "ridge", encoder=create_encoder("tiny")).encoder == "tiny"
    with pytest.raises(BundleError, match="weights tiny-seed0.*but the encoder here is 'tiny' with weights tiny-seed1"):
        load_bundle(bundles / "ridge", encoder=create_encoder("tiny", seed=1))


def test_metadata_router_needs_meta(bundles, slides, tmp_path, capsys):
    from histomoe_core.bundle import load_bundle

    assert load_bundle(bundles / "meta").reads_metadata()
    out = tmp_path / "out"
    _fails(["predict", str(slides["tiff"]), "--model", str(bundles / "meta"), "--out", str(out)], capsys, "--meta")
    assert not out.exists()
    assert main(["predict", str(slides["tiff"]), "--model", str(bundles / "meta"), "--out", str(out), "--no-zarr",
                 "--no-progress", "--meta", "organ=kidney", "cancer_type=clear cell renal cell carcinoma"]) == 0
    a = ad.read_h5ad(out / "predictions.h5ad")
    assert json.loads(a.uns["provenance"])["prediction"]["meta"]["organ"] == "kidney"
