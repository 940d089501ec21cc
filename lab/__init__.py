"""App-side helpers of the SpecLab lab: the method table (`methods`), model presets and loading (`models`), the
per-model line of runs (`line`), run orchestration and streaming (`runner`), image and video outputs (`output`),
the comparison with the full run (`compare`), uploaded traces (`traces`), per-session state and run files
(`session`), request limits (`limits`), latent previews (`preview`). No Gradio import here."""
