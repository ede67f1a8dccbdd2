"""`python app.py --model DIR_OR_HUB_ID [--host 127.0.0.1 --port 7860] [--backend auto|torch|onnx]`: the Gradio demo."""
import sys

from cifar_tl.demo import main

if __name__ == "__main__":
    sys.exit(main())
