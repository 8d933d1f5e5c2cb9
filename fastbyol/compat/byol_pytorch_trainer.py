class BYOLTrainer: pass
