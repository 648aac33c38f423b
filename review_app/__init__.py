"""Review app: a person checks the model's rewrite of a draft comment, edits it and saves it.

    python -m review_app [--db URL] [--base-url URL] [--model NAME] [--port N]

- ``app.py``        the Streamlit page (draft -> "Ask LLM" -> editable output + diffs -> "Save Changes",
                    history of saved items)
- ``llm.py``        the model call through LangChain (ChatOpenAI for any OpenAI-compatible server:
                    NIM, vLLM, llama.cpp; ChatNVIDIA optionally), prompts from recipes.prompt
- ``store.py``      saved reviews through SQLAlchemy (SQLite file by default, Snowflake by URL)
- ``diff.py``       character-level diffs (recipes.textdiff) rendered as HTML (Japanese has no spaces to
                    diff words on)
- ``settings.py``   settings from the command line / environment
- ``screenshot.py`` a PNG of the running page with headless Chromium

Saved reviews are the next training set: ``python -m recipes.prepare_data --from-db URL ...``.
"""
