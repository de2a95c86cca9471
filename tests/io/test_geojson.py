"""QuPath GeoJSON written in bulk: tile objects and their ids."""

from __future__ import annotations

import json
import uuid

import numpy as np

from xtpath.io.geojson import feature_collection, polygon_feature, tile_features, uuid4_strings, write_geojson


def test_uuid4_strings_are_distinct_rfc4122_version_4():
    ids = uuid4_strings(5000)
    assert len(ids) == 5000 and len(set(ids)) == 5000
    parsed = [uuid.UUID(s) for s in ids]
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in parsed)
    assert all(str(u) == s for u, s in zip(parsed, ids))  # canonical lower-case 8-4-4-4-12 form
    assert uuid4_strings(0) == []


def test_tile_features_geometry_class_and_measurements():
    xy = np.array([[0, 0], [512, 256], [1024.5, 0]])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    feats = tile_features(xy, 256, probs, ["normal", "tumour"], [(0, 200, 0), (200, 0, 0)])
    doc = json.loads(json.dumps(feature_collection(feats)))
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 3
    f = doc["features"][1]
    assert f["geometry"]["coordinates"] == [[[512, 256], [768, 256], [768, 512], [512, 512], [512, 256]]]
    assert f["properties"]["objectType"] == "tile"
    assert f["properties"]["classification"] == {"name": "tumour", "color": [200, 0, 0]}
    assert f["properties"]["measurements"] == {"prob_normal": 0.2, "prob_tumour": 0.8}
    assert doc["features"][0]["properties"]["classification"]["name"] == "normal"
    assert doc["features"][2]["geometry"]["coordinates"][0][1] == [1280.5, 0]
    assert len({f["id"] for f in doc["features"]}) == 3


def test_write_geojson_round_trips_tiles_and_numpy_values(tmp_path):
    xy = np.array([[0, 0], [512, 256]])
    probs = np.array([[0.123456789, 0.876543211], [0.5, 0.5]])
    feats = tile_features(xy, 256, probs, ["normal", "tumour"], [(0, 200, 0), (200, 0, 0)])
    # numpy numbers (float32 measurements, int64 coordinates) are written as plain JSON numbers
    feats.append(polygon_feature([[[np.int64(1), np.int64(2)], [3, 2], [3, 4], [1, 2]]], name="Tumor",
                                 measurements={"area": np.float32(2.5)}))
    path = tmp_path / "out" / "regions.geojson"
    write_geojson(path, feats)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and text.count("\n") == 1
    doc = json.loads(text)
    assert doc == json.loads(json.dumps(feature_collection(feats), default=float))
    assert doc["features"][0]["properties"]["measurements"] == {"prob_normal": 0.123457, "prob_tumour": 0.876543}
    assert doc["features"][2]["geometry"]["coordinates"][0][0] == [1, 2]
    assert doc["features"][2]["properties"]["measurements"] == {"area": 2.5}
    assert [p.name for p in path.parent.iterdir()] == ["regions.geojson"]  # no temporary file left


def test_read_features_splits_multi_geometries_and_read_annotations_keeps_polygons(tmp_path):
    from xtpath.io.geojson import read_annotations, read_features

    square = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
    feats = [
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [square, square]},
         "properties": {"classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
         "properties": {"classification": {"name": "Cell"}}},
        {"type": "Feature", "geometry": {"type": "GeometryCollection", "geometries": []}, "properties": {}},
        None,
    ]
    p = tmp_path / "a.geojson"
    p.write_text(json.dumps(feats))  # QuPath's "export as array"
    assert read_features(p) == [("Tumor", "polygon", square), ("Tumor", "polygon", square),
                                ("annotation", "line", [[0, 0], [5, 5]]), ("Cell", "point", [1, 2]),
                                ("Cell", "point", [3, 4])]
    assert read_annotations(p) == [("Tumor", square), ("Tumor", square)]
