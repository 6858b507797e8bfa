"""The Gradio app: one builder and one handler module per tab, the public API (endpoints), the in-page player."""
