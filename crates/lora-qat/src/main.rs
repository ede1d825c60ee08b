fn main() {
    println!("lora-qat");
}
