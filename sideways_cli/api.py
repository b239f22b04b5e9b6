"""Using a trained run from Python: load it once, predict many videos.

    from sideways_cli.api import Predictor

    predictor = Predictor("runs/ucf101_c3d/sideways", checkpoint="best")
    for path in ["a.mp4", "b.mp4"]:
        prediction = predictor.predict(path, top_k=5)
        print(prediction.video, prediction.top)  # [(label, probability), ...], most likely first
    for online in predictor.predict_frames("a.mp4"):  # online: one frame at a time, any length
        print(online.frame, online.top)

A prediction averages the run's evaluation views of the video, so on a video of the run's
validation split it equals what ``sideways eval --dump`` writes for it (docs/commands.md).
"""

from sideways_cli.run.predict import FramePrediction, Prediction, Predictor

__all__ = ["FramePrediction", "Prediction", "Predictor"]
