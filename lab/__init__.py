"""App-side helpers of the SpecLab lab: model presets and loading (`models`), run orchestration and
streaming (`runner`), image metrics (`metrics`), latent previews (`preview`). No Gradio import here."""
