"""A 3,000-character text of the kind users paste: Chinese and English paragraphs, mixed sentences,
numbers, dates, currency, percentages, URLs, e-mail addresses, emoji, repeated punctuation, line breaks,
and one 600-character run without any punctuation in each language. Shared by the long-text tests."""
from __future__ import annotations

ZH_RUN = (  # 600+ characters, no punctuation at all (a transcript pasted without it)
    "那天早上天还没有亮我们就从村口出发沿着弯弯曲曲的山路一直往上走路边的野花在晨风里轻轻摇摆"
    "远处的山峰被一层薄薄的云雾笼罩着看起来就像一幅还没有画完的水墨画我的爷爷走在最前面他虽然已经"
    "七十多岁了但是脚步依然非常稳健他一边走一边给我们讲他年轻时候在这座山里砍柴采药的故事他说那时候"
    "山里有很多野兽晚上常常能听到狼的叫声所以大家都不敢一个人上山总是三五成群结伴而行我们听得入了迷"
    "连脚下的石头绊了一下都没有注意到走了大约两个小时太阳终于从东边的山头升了起来金色的阳光洒满了整个"
    "山谷树叶上的露珠闪闪发光像无数颗小小的钻石妹妹高兴地跑来跑去想要把每一颗露珠都数清楚爸爸笑着说"
    "你要是能数清楚这些露珠就能数清楚天上的星星了妹妹不服气地说那我今天晚上就去数星星大家都被她逗得"
    "哈哈大笑中午的时候我们在半山腰的一块大石头旁边停下来休息妈妈从背包里拿出早就准备好的馒头咸菜和"
    "煮鸡蛋大家围坐在一起吃得特别香吃完饭以后爷爷带着我们去看他小时候种下的那棵松树那棵松树现在已经"
    "长得又高又粗两个大人手拉着手都抱不过来爷爷轻轻地抚摸着粗糙的树皮眼睛里闪着泪光他说这棵树陪着他"
    "度过了很多艰难的日子每次遇到想不通的事情他就会来这里坐一坐听听风吹过松针的声音心里就慢慢平静下来"
    "下午我们继续往山顶爬最后一段路特别陡峭我们只能手脚并用一步一步地往上挪终于在太阳落山之前爬上了山顶"
    "站在山顶上往下看整个村庄都变得小小的我们家的房子就像一个火柴盒那一刻我突然明白了爷爷为什么这么爱这座山"
)
EN_RUN = (  # 600+ characters, words and spaces only
    "the morning was cold and quiet when we left the village and walked along the river towards the old "
    "stone bridge where my grandfather used to sit and watch the boats go by for hours on end he told us "
    "that the river had changed its course three times in his life and that each time the people of the "
    "valley had to move their fields and their houses a little further up the hill we listened to him "
    "while the sun climbed slowly over the trees and the mist lifted from the water in long white ribbons "
    "that drifted away on the wind my sister kept asking how old the bridge really was and nobody could "
    "give her a straight answer because the stones had been replaced so many times that it was hard to say "
    "which parts were old and which parts were new and in the end we all agreed that it did not matter much"
)
TEXT = (
    "2024年3月15日，我们公司发布了第三季度财报。营业收入达到1,299.50万元，同比增长15.5%，净利润率为23%。"
    "董事长在发布会上说：“这是我们成立10年以来最好的成绩！！！”与会的300多位投资者纷纷表示赞同。"
    "下午3:30，股价上涨了7.8%，收盘于每股88.88元。\n\n"
    "更多信息请访问 https://www.example.com/reports/2024-q3.html 或者发邮件到 investor.relations@example.com "
    "联系我们😀。客服电话是400-123-4567，工作时间为周一至周五9:00到18:00🎉🎉。\n"
    "🎉🎉🎉\n"
    f"{ZH_RUN}\n\n"
    "真的吗？？？太好了！！！我不信……好吧。。。你确定吗？！\n\n"
    "第四季度的计划如下：第一，把用户数量从1200万提高到1500万，增长25%；第二，把平均响应时间从350毫秒"
    "降低到200毫秒以内；第三，在2024年12月31日之前完成新版本的上线。王经理补充道：“如果一切顺利，我们"
    "明年的目标是覆盖全国80%以上的城市。”他还提醒大家，预算只有500万元，每一分钱都要花在刀刃上！\n"
    "会议结束的时候已经是晚上8点半了，大家虽然很累，但是心情都很好😊😊。\n\n"
    "【通知】（请转发）明天上午10:00在三楼会议室召开全体员工大会，预计持续1.5小时，请提前5分钟到场。"
    "没有按时参加的同事，请在下周一之前向人事部提交书面说明，谢谢配合！\n\n"
    "On March 15, 2024, the company reported revenue of $1,299.50 million, up 15% from last year.\n"
    "The board approved a dividend of $0.25 per share, and 1,001 employees received a bonus.\n"
    "Visit https://www.example.com/investors or write to ir@example.com for details. Wow!!! Really?! OK...\n\n"
    f"{EN_RUN}\n\n"
    "Our support team answered 12,345 tickets in the third quarter; 98.6% of them within one day. "
    "\"We could not have done it without you,\" said Dr. Smith, who joined the team in 2019. The next "
    "release, version 2.4.1, is planned for January 10, 2025; it fixes 37 bugs and adds 5 features.\n\n"
    "我们用 Python 3.11 和 PyTorch 训练了这个模型，在一张显卡上只需要2个小时。The model speaks 中文 and "
    "English fluently, 而且 it handles numbers like 3.14 and 42 well.\n"
    "最后，感谢大家的耐心阅读👍！如有问题，欢迎随时联系我们——我们会在24小时内回复。\n\n"
    "A last paragraph in English: thank you for reading this far. If anything is unclear, please contact "
    "support@example.org; we answer within 24 hours, 7 days a week. Have a great day 😀!"
)
EN_TEXT = TEXT[TEXT.index("On March 15"):TEXT.index("我们用 Python")]  # English only: the en path
